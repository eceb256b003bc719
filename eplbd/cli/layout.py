"""``eplbd layout show | diff``: a group's layouts, to read, to reuse, and to compare.

::

    eplbd layout show [--epoch N] [-o FILE] [--group NAME] [--json]
    eplbd layout diff A B [--gpus G] [--expert-bytes N] [--group NAME] [--json]

``show`` asks the planner for the layout of epoch N (default: the one in service; any kept
epoch, 0 for the default layout, or an epoch being prepared) and prints, per layer and GPU,
the experts in its slots; ``-o FILE`` writes it as Layout JSON, the format
``eplbd plan --previous FILE`` reads. ``diff`` compares two layouts, each an epoch (asked of
the planner) or a Layout JSON file: the layers and slots that change, which expert moves from
which GPU to which (from a GPU that held it in A; the receiving GPU itself when it already
had a replica), and the bytes that moves: slots changed x one expert's weights, taken from
``--expert-bytes`` or else the planner's ``expert_bytes`` setting (unknown without either).
Two files need no planner, but ``--gpus``.

Exit codes: 0 ok, 1 an epoch the planner does not keep (or another refusal), 2 usage, 69/75
unreachable or timeout, 78 a bad layout file or settings. Neither imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eplbd.cli._client import (
    CliError,
    PlannerClient,
    add_common_arguments,
    fail,
    fmt_ago,
    fmt_ranks,
    open_client,
    quiet_broken_pipe,
)
from eplbd.cli._output import Output, write_file
from eplbd.ops.exits import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_USAGE

__all__ = ["add_arguments", "diff_layouts", "read_layout_file", "run"]

_LAYOUT_SCHEMAS = (1, 2)  # eplbd.layout's JSON forms (not imported: it needs torch); 2: shares


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="layout_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show", help="a layout of the planner (default: the one in service)", description=__doc__
    )
    show.add_argument(
        "--epoch", type=_epoch, metavar="N", help="the epoch (default: the one in service)"
    )
    show.add_argument(
        "-o", "--output", metavar="FILE", help="write it as Layout JSON (eplbd plan --previous)"
    )
    add_common_arguments(show, watch=False, layers=False)
    diff = sub.add_parser(
        "diff", help="what changes from layout A to layout B", description=__doc__
    )
    for name in ("a", "b"):
        diff.add_argument(name, metavar=name.upper(), help="an epoch number or a Layout JSON file")
    diff.add_argument(
        "--gpus", type=_positive, metavar="G", help="GPUs of the group (needed for two files)"
    )
    diff.add_argument(
        "--expert-bytes",
        type=_positive,
        metavar="N",
        help="bytes of one expert's weights in one layer (default: the planner's setting)",
    )
    add_common_arguments(diff, watch=False, layers=False)


def _epoch(text: str) -> int:
    from eplbd.cli.control import epoch_number

    return epoch_number(text)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return n


def run(args: argparse.Namespace) -> int:
    return quiet_broken_pipe(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    out = Output.from_args(args)
    try:
        if args.layout_command == "show":
            _show(args, out)
        else:
            _diff(args, out)
    except CliError as e:
        return fail(args, e)
    out.flush()
    return EXIT_OK


# --- show ------------------------------------------------------------------------------------


def fetch_layout(client: PlannerClient, group: str | None, epoch: int | None) -> dict[str, Any]:
    """The planner's ``layout`` data of one group; CliError(1) when the epoch is not kept."""
    from eplbd.cli.control import resolve_group

    name = resolve_group(client, group)
    data = client.status("layout", name, epoch=epoch)
    (g,) = data.get("groups") or [None]
    if g is None or g.get("layout") is None:
        kept = ", ".join(str(e) for e in (g or {}).get("kept") or []) or "none"
        raise CliError(
            f"no layout of epoch {(g or {}).get('epoch', epoch)} is kept in group {name} "
            f"(kept: {kept})",
            EXIT_ERROR,
            "unknown_epoch",
        )
    g["at"] = data.get("at")
    return dict(g)


def _show(args: argparse.Namespace, out: Output) -> None:
    with open_client(args) as client:
        g = fetch_layout(client, args.group, args.epoch)
    if args.output:
        try:
            write_file(args.output, json.dumps(g["layout"], separators=(",", ":")) + "\n")
        except OSError as e:
            raise CliError(f"cannot write {args.output}: {e.strerror or e}", EXIT_ERROR) from None
    if out.json:
        out.emit_json(g)
        return
    lay = g["layout"]
    p2l: list[list[int]] = lay["phy2log"]
    gpus = int(g.get("num_gpus") or 1)
    per = len(p2l[0]) // gpus
    state = g.get("state")
    when = fmt_ago(g.get("committed_at"), g.get("at")) if g.get("committed_at") else ""
    service = ", in service" if g.get("epoch") == g.get("current_epoch") else ""
    out.line(
        out.style(f"group {g.get('group')}  epoch {g.get('epoch')}", "bold")
        + f" ({state}{' ' + when if when else ''}{service})  {len(p2l)} layers x "
        + f"{lay['num_logical_experts']} experts in {len(p2l[0])} slots on {gpus} GPUs"
        + f"; kept epochs: {fmt_ranks(g.get('kept') or [])}"
    )
    share = lay.get("share")
    rows = [
        [
            layer,
            gpu,
            " ".join(
                _slot_text(row[p], None if share is None else share[layer][p])
                for p in range(gpu * per, (gpu + 1) * per)
            ),
        ]
        for layer, row in enumerate(p2l)
        for gpu in range(gpus)
    ]
    head = "EXPERTS (slot order)" if share is None else "EXPERTS (slot order; e:s = share s)"
    out.table(["LAYER", "GPU", head], rows, align=">><")
    if args.output:
        out.line(f"written to {args.output} (eplbd plan --previous {args.output} reads it)")


# --- diff ------------------------------------------------------------------------------------


def read_layout_file(path: str) -> dict[str, Any]:
    """A Layout JSON file (``eplbd layout show -o`` / ``eplbd plan -o``), checked as
    :meth:`eplbd.layout.Layout.from_dict` would, without torch. CliError(78) if it is not."""

    def bad(why: str) -> CliError:
        return CliError(f"{path}: {why}", EXIT_CONFIG, "bad_layout")

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not a layout JSON file ({e})") from None
    except RecursionError:  # [[[[...: json.loads gives up, the file is bad
        raise bad("not a layout JSON file (nested too deeply)") from None
    ver = doc.get("schema_version") if isinstance(doc, dict) else None
    if isinstance(ver, bool) or ver not in _LAYOUT_SCHEMAS:
        raise bad("not a layout JSON file (schema_version 1 or 2 expected)")
    n_exp, p2l = doc.get("num_logical_experts"), doc.get("phy2log")
    if not isinstance(n_exp, int) or isinstance(n_exp, bool) or n_exp < 1:
        raise bad("num_logical_experts must be a positive integer")
    if not isinstance(p2l, list) or not p2l or not all(isinstance(r, list) and r for r in p2l):
        raise bad("phy2log must be a non-empty list of non-empty lists [layers][slots]")
    if len({len(r) for r in p2l}) != 1:
        raise bad("phy2log rows differ in length")
    for layer, row in enumerate(p2l):
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < n_exp for e in row):
            raise bad(f"layer {layer} holds an expert id outside [0, {n_exp})")
        if len(set(row)) != n_exp:
            raise bad(f"layer {layer} leaves an expert without a replica")
    share = doc.get("share")
    if share is not None:
        if ver != 2 or not isinstance(share, list) or len(share) != len(p2l):
            raise bad("share must be [layers][slots] like phy2log (schema_version 2)")
        for layer, (row, sh) in enumerate(zip(p2l, share, strict=True)):
            ok = isinstance(sh, list) and len(sh) == len(row)
            if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in sh):
                raise bad(f"share of layer {layer} is not a list of {len(row)} integers")
            if min(sh) < 0 or {e for e, x in zip(row, sh, strict=True) if x > 0} != set(row):
                raise bad(f"share of layer {layer}: negative, or an expert with no share > 0")
    return doc


def _slot_text(expert: int, share: int | None) -> str:
    """A slot in ``eplbd layout show``: its expert, and its share when not 1 (0: idle)."""
    return str(expert) if share is None or share == 1 else f"{expert}:{share}"


def diff_layouts(a: list[list[int]], b: list[list[int]], num_gpus: int) -> dict[str, Any]:
    """Slot by slot from ``a`` to ``b`` (phy2log [L][P] each, P a multiple of ``num_gpus``):
    ``moves`` [{layer, slot, gpu, expert, replaces, from_gpu}] where ``from_gpu`` held the
    expert in ``a`` (the receiving GPU itself when it had a replica: a local copy), and
    ``layers`` [{layer, slots}] for the layers that change."""
    per = len(a[0]) // num_gpus
    moves: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for layer, (old, new) in enumerate(zip(a, b, strict=True)):
        holders: dict[int, list[int]] = {}
        for slot, e in enumerate(old):
            holders.setdefault(e, []).append(slot // per)
        changed = 0
        for slot, (was, now) in enumerate(zip(old, new, strict=True)):
            if was == now:
                continue
            changed += 1
            gpu = slot // per
            src = holders.get(now, [])
            moves.append(
                {
                    "layer": layer,
                    "slot": slot,
                    "gpu": gpu,
                    "expert": now,
                    "replaces": was,
                    "from_gpu": gpu if gpu in src else (min(src) if src else None),
                }
            )
        if changed:
            layers.append({"layer": layer, "slots": changed})
    return {"moves": moves, "layers": layers}


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _side(spec: str, client: PlannerClient | None, group: str | None) -> dict[str, Any]:
    if Path(spec).exists() or not spec.isdigit():
        return {"file": spec, "layout": read_layout_file(spec)}
    if client is None:  # pragma: no cover - the caller opens one for epochs
        raise CliError("an epoch needs the planner", EXIT_USAGE)
    return fetch_layout(client, group, int(spec))


def _diff(args: argparse.Namespace, out: Output) -> None:
    epochs = [s for s in (args.a, args.b) if not Path(s).exists() and s.isdigit()]
    if epochs:
        with open_client(args) as client:
            a, b = _side(args.a, client, args.group), _side(args.b, client, args.group)
    else:
        a, b = _side(args.a, None, None), _side(args.b, None, None)
    la, lb = a["layout"], b["layout"]
    pa, pb = la["phy2log"], lb["phy2log"]
    shape_a = (len(pa), len(pa[0]), la["num_logical_experts"])
    shape_b = (len(pb), len(pb[0]), lb["num_logical_experts"])
    if shape_a != shape_b:
        raise CliError(
            f"the layouts differ in shape: A is {shape_a[0]} layers x {shape_a[1]} slots "
            f"({shape_a[2]} experts), B {shape_b[0]} x {shape_b[1]} ({shape_b[2]})",
            EXIT_CONFIG,
            "bad_layout",
        )
    gpus = args.gpus or a.get("num_gpus") or b.get("num_gpus")
    if not gpus:
        raise CliError("give --gpus G: layout files do not say how many GPUs", EXIT_USAGE)
    if shape_a[1] % gpus:
        raise CliError(f"{shape_a[1]} slots do not split over {gpus} GPUs", EXIT_CONFIG)
    d = diff_layouts(pa, pb, int(gpus))
    ones = [[1] * shape_a[1]] * shape_a[0]
    sa, sb = la.get("share") or ones, lb.get("share") or ones
    resplit = [i for i in range(shape_a[0]) if sa[i] != sb[i]]
    if args.expert_bytes:
        size, source = args.expert_bytes, "--expert-bytes"
    elif a.get("expert_bytes") or b.get("expert_bytes"):
        size, source = a.get("expert_bytes") or b.get("expert_bytes"), "planner expert_bytes"
    else:
        size, source = None, None
    doc = {
        "group": a.get("group") or b.get("group"),
        "a": {k: a[k] for k in ("epoch", "file", "state") if k in a},
        "b": {k: b[k] for k in ("epoch", "file", "state") if k in b},
        "num_layers": shape_a[0],
        "num_physical_experts": shape_a[1],
        "num_gpus": int(gpus),
        "layers_changed": [x["layer"] for x in d["layers"]],
        "layers_resplit": resplit,  # layers whose split (shares) changes: no bytes move
        "slots_moved": len(d["moves"]),
        "layers": d["layers"],
        "moves": d["moves"],
        "expert_bytes": size,
        "expert_bytes_source": source,
        "bytes_moved": None if size is None else size * len(d["moves"]),
    }
    if out.json:
        out.emit_json(doc)
    else:
        _render_diff(out, doc)


def _name(side: dict[str, Any]) -> str:
    return f"epoch {side['epoch']}" if "epoch" in side else str(side.get("file"))


def _render_diff(out: Output, doc: dict[str, Any]) -> None:
    n, total = doc["slots_moved"], doc["num_layers"] * doc["num_physical_experts"]
    group = f" (group {doc['group']})" if doc.get("group") else ""
    out.line(
        out.style(f"{_name(doc['a'])} -> {_name(doc['b'])}{group}", "bold")
        + f": {len(doc['layers_changed'])} of {doc['num_layers']} layers change, {n} of "
        + f"{total} slots ({100.0 * n / total:.1f}%), on {doc['num_gpus']} GPUs"
    )
    if doc["bytes_moved"] is None:
        out.line("bytes moved: unknown (give --expert-bytes N, or set the planner's expert_bytes)")
    else:
        out.line(
            f"bytes moved: {n} x {_fmt_bytes(doc['expert_bytes'])} = "
            f"{_fmt_bytes(doc['bytes_moved'])} (expert size from {doc['expert_bytes_source']})"
        )
    if doc["layers_resplit"]:
        out.line(
            f"split (shares) changes in {len(doc['layers_resplit'])} layer(s): "
            + fmt_ranks(doc["layers_resplit"])
            + " (no weights move for it)"
        )
    if not n:
        out.line(out.style("no slot changes", "dim"))
        return
    rows = [
        [
            m["layer"],
            m["slot"],
            f"e{m['expert']}",
            "-" if m["from_gpu"] is None else m["from_gpu"],
            m["gpu"],
            f"e{m['replaces']}",
            "local copy" if m["from_gpu"] == m["gpu"] else "",
        ]
        for m in doc["moves"]
    ]
    out.table(
        ["LAYER", "SLOT", "EXPERT", "FROM GPU", "TO GPU", "REPLACES", "NOTE"],
        rows,
        align=">><>><<",
    )
