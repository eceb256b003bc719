"""One EP rank of the reference MoE stack, routed through an :class:`~eplbd_client.EplbClient`.

Per layer: route (the model's router), ``client.map_and_record`` (logical -> physical slot),
dispatch each (token, k) pair to the rank that owns its slot (``all_to_all_single``: works on
gloo and NCCL), run the slot's expert FFN there from the rank's slot-major weights, send the
results back, and combine them weighted by the router probabilities in k order, the same order
as :meth:`MoEModel.reference_forward`. So every output equals the reference up to
floating-point summation order, whatever the layout, as long as the client keeps weights and
maps consistent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from eplbd.testing._moe import MoEModel, expert_ffn

if TYPE_CHECKING:
    from eplbd_client import EplbClient

__all__ = ["EPMoEEngine"]


class EPMoEEngine:
    """The MoE layers of rank ``client.ep_rank``.

    Holds slot-major weights ``w13[l] [S, 2F, H]`` and ``w2[l] [S, H, F]`` built from the
    client's current layout and registered with it. ``dense=True`` computes every local slot on
    every token with masks (no host sync, so CUDA-graph capturable; single rank only).
    ``last_phys[l]`` keeps the physical ids of the last forward ([T, K]), for tests.
    """

    def __init__(
        self, model: MoEModel, client: EplbClient, group: Any = None, *, dense: bool = False
    ) -> None:
        self.model = model
        self.client = client
        self.group = group
        self.rank, self.size = client.ep_rank, client.ep_size
        self.S = client.slots_per_rank
        if dense and self.size != 1:
            raise ValueError("dense forward is single-rank only")
        self.dense = dense
        p2l = client.layout.phy2log
        lo, hi = self.rank * self.S, (self.rank + 1) * self.S
        self.w13: list[torch.Tensor] = []
        self.w2: list[torch.Tensor] = []
        for layer in range(model.cfg.num_layers):
            idx = p2l[layer, lo:hi].to(model.device)
            self.w13.append(model.w13[layer].index_select(0, idx).contiguous())
            self.w2.append(model.w2[layer].index_select(0, idx).contiguous())
            client.register_expert_weights(layer, [self.w13[layer], self.w2[layer]])
        self.last_phys: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """x [T, H] (T may be 0: a dummy step still joins the collectives) -> [T, H]."""
        h = x
        K = self.model.cfg.top_k
        self.last_phys = []
        for layer in range(self.model.cfg.num_layers):
            w, ids = self.model.route(layer, h, step)
            phys = self.client.map_and_record(layer, ids)
            self.last_phys.append(phys)
            T = h.shape[0]
            if self.dense:
                y = self._dense(layer, h, w, phys)
            else:
                res = self._experts(layer, h.repeat_interleave(K, dim=0), phys.reshape(-1))
                y = (w.unsqueeze(-1) * res.view(T, K, h.shape[1])).sum(dim=1)
            h = h + y
        return h

    def _local(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(rows)
        for s in torch.unique(slots).tolist():
            m = slots == s
            out[m] = expert_ffn(self.w13[layer][s], self.w2[layer][s], rows[m])
        return out

    def _experts(self, layer: int, rows: torch.Tensor, phys: torch.Tensor) -> torch.Tensor:
        """rows [N, H], phys [N] -> each row through its slot's expert, [N, H]."""
        if self.size == 1:
            return self._local(layer, rows, phys)
        import torch.distributed as dist

        G, S = self.size, self.S
        owner = torch.div(phys, S, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=G).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        # The local slot travels as an extra column (exact: small integers).
        packed = torch.cat([rows, (phys - owner * S).to(rows.dtype).unsqueeze(1)], dim=1)[order]
        recv = packed.new_empty(sum(recv_splits), packed.shape[1])
        dist.all_to_all_single(recv, packed, recv_splits, send_splits, group=self.group)
        out = self._local(layer, recv[:, :-1].contiguous(), recv[:, -1].round().long())
        back = rows.new_empty(rows.shape[0], rows.shape[1])
        dist.all_to_all_single(back, out, send_splits, recv_splits, group=self.group)
        res = torch.empty_like(back)
        res[order] = back
        return res

    def _dense(
        self, layer: int, h: torch.Tensor, w: torch.Tensor, phys: torch.Tensor
    ) -> torch.Tensor:
        y = torch.zeros_like(h)
        for s in range(self.S):
            coef = (w * (phys == s).to(w.dtype)).sum(dim=-1, keepdim=True)
            y = y + coef * expert_ffn(self.w13[layer][s], self.w2[layer][s], h)
        return y
