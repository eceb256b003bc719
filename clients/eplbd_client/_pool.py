"""A node-local host memory pool holding every expert's weights, shared by the node's ranks.

Layout on disk (a directory, ideally on ``/dev/shm`` so it lives in RAM): one raw file per
(layer, tensor) holding ``[E, ...]`` logical-expert-major weights, and ``manifest.json`` with
their dtypes and shapes. :meth:`HostExpertPool.open` maps the files with
``torch.from_file(shared=True)``: every process of the node that opens the pool reads the same
physical pages, so the pool costs its size once per node, not once per rank. On CUDA the
mapping is page-locked in place (``cudaHostRegister``) so that copies to the GPU are
asynchronous.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["HostExpertPool"]

_log = logging.getLogger("eplbd_client")
_MANIFEST = "manifest.json"
_SCHEMA = 1


class HostExpertPool:
    """Every expert's weights per layer: ``layer(l)[k]`` is a CPU tensor ``[E, ...]`` (the
    k-th weight tensor of layer l, e.g. w13 ``[E, 2F, H]`` and w2 ``[E, H, F]``), expert-major
    so that ``layer(l)[k][x]`` has the shape of one slot of the engine's slot-major tensor.
    """

    def __init__(self, layers: Sequence[Sequence[torch.Tensor]]) -> None:
        if not layers:
            raise ValueError("a pool needs at least one layer")
        E = int(layers[0][0].shape[0])
        for i, ts in enumerate(layers):
            for t in ts:
                if t.device.type != "cpu" or t.dim() < 1 or t.shape[0] != E:
                    raise ValueError(f"pool layer {i}: every tensor must be a CPU [E={E}, ...]")
        self._layers = [list(ts) for ts in layers]
        self.num_experts = E
        self._registered: list[int] = []

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, layer: int) -> list[torch.Tensor]:
        return self._layers[layer]

    @classmethod
    def create(
        cls, directory: str | os.PathLike[str], layers: Sequence[Sequence[torch.Tensor]]
    ) -> HostExpertPool:
        """Write ``layers`` (layer -> list of [E, ...] tensors) under ``directory`` (created),
        then open it shared. Call once per node; the other ranks call :meth:`open`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        manifest: list[list[dict[str, Any]]] = []
        for li, ts in enumerate(layers):
            entry = []
            for k, t in enumerate(ts):
                name = f"l{li}_t{k}.bin"
                raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                tmp = d / (name + ".tmp")
                raw.numpy().tofile(tmp)
                os.replace(tmp, d / name)
                entry.append(
                    {
                        "file": name,
                        "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": list(t.shape),
                    }
                )
            manifest.append(entry)
        tmp = d / (_MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"schema": _SCHEMA, "layers": manifest}))
        os.replace(tmp, d / _MANIFEST)
        return cls.open(d)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, pin: bool = True) -> HostExpertPool:
        """Map a pool written by :meth:`create`, shared with the other processes of the node.
        ``pin``: page-lock it in place when CUDA is available."""
        d = Path(directory)
        meta = json.loads((d / _MANIFEST).read_text())
        if meta.get("schema") != _SCHEMA:
            raise ValueError(f"pool manifest schema {meta.get('schema')!r} is not {_SCHEMA}")
        layers: list[list[torch.Tensor]] = []
        for entry in meta["layers"]:
            ts = []
            for t in entry:
                dtype = getattr(torch, str(t["dtype"]))
                shape = [int(s) for s in t["shape"]]
                nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                path = d / t["file"]
                # A shared mapping grows a short file with zeros (and writes them back): a
                # truncated or foreign file would serve zeros as weights. The mapping stays
                # shared read-write: pinning needs writable pages, and a private mapping
                # would copy every pinned page into each process.
                size = path.stat().st_size
                if size != nbytes:
                    raise ValueError(
                        f"pool file {path} has {size} bytes, the manifest says {nbytes} "
                        f"({t['dtype']} {shape})"
                    )
                raw = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
                ts.append(raw.view(dtype).view(shape))
            layers.append(ts)
        pool = cls(layers)
        if pin and torch.cuda.is_available():
            pool._pin()
        return pool

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        for ts in self._layers:
            for t in ts:
                if t.is_pinned():
                    continue
                err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                if int(err) == 0:
                    self._registered.append(t.data_ptr())
                else:  # pragma: no cover - GPU only
                    # A failed runtime call leaves CUDA's last-error set, and torch would
                    # report it at its next kernel launch: clear it here.
                    _clear_cuda_last_error()
                    _log.warning(
                        "cudaHostRegister failed (%s): pool copies will be synchronous", err
                    )

    def close(self) -> None:
        """Undo the page-locking (the mapping itself goes with the tensors)."""
        if self._registered:
            cudart = torch.cuda.cudart()
            for ptr in self._registered:
                cudart.cudaHostUnregister(ptr)
            self._registered.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._layers for t in ts)


def _clear_cuda_last_error() -> None:  # pragma: no cover - GPU only
    """Reset cudaGetLastError through the CUDA runtime that torch has loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line}
    except OSError:
        paths = set()
    for path in sorted(paths) or ["libcudart.so"]:
        try:
            ctypes.CDLL(path).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
