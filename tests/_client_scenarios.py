"""What each rank runs in the multi-process client tests (see tests/_mp.py).

``layout_changes``: the reference MoE stack served through EplbClient while layouts change
several times, prepared on each rank at a different step:

    epoch 1  good layout                                   -> commits
    epoch 2  rank 0 gets a layout with an expert missing   -> refused there, dropped everywhere
    epoch 3  good layout                                   -> commits
    epoch 4  rank 0 aborts it after preparing              -> dropped everywhere
    epoch 5  the last rank prepares after the deadline     -> dropped everywhere, late prepare
             of the others passed (fake clock = step)         refused
    epoch 6  good layout, delivered as the agent would     -> commits
    epoch 7  rank 0 gets another layout than the others    -> dropped everywhere

Each rank returns, per step, the epoch it served, the error against the no-EPLB reference and
the per-slot load it routed, plus everything the client put in its outbox.

``share_changes``: the same stack while the weighted split changes (see its docstring).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from eplbd_client import (
    EplbClient,
    HostExpertPool,
    HostPoolWeightSource,
    PeerWeightSource,
    PrepareError,
    WeightSource,
)

from eplbd.testing import EPMoEEngine, MoEConfig, MoEModel, random_layout

CFG = MoEConfig(num_layers=2, num_experts=8, top_k=2, hidden=16, ffn=32, seed=3)
NUM_PHYSICAL = 12
SYNC = 4
STEPS = 140


def layouts(world: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        e: random_layout(CFG.num_layers, CFG.num_experts, NUM_PHYSICAL, generator=g)
        for e in range(1, 8)
    }


def random_share(phy2log: torch.Tensor, num_logical: int, seed: int) -> torch.Tensor:
    """A valid weighted split of ``phy2log`` [L, P]: shares 0-2 per slot, some idle (0),
    every expert with a positive share, each expert's shares adding up to <= P - E + 1."""
    g = torch.Generator().manual_seed(seed)
    L, P = phy2log.shape
    share = torch.randint(0, 3, (L, P), generator=g)
    for layer in range(L):
        for e in range(num_logical):
            slots = (phy2log[layer] == e).nonzero().flatten()
            if len(slots) == 1:
                share[layer, slots[0]] = max(1, int(share[layer, slots[0]]))
                continue
            if int(share[layer, slots].sum()) == 0:
                share[layer, slots[0]] = 1
            while int(share[layer, slots].sum()) > P - num_logical + 1:
                share[layer, slots[int(share[layer, slots].argmax())]] -= 1
    return share


def make_pool(tmp: Path) -> None:
    model = MoEModel(CFG)
    HostExpertPool.create(tmp / "pool", [model.expert_weights(i) for i in range(CFG.num_layers)])


def _source(kind: str, tmp: str, gpus_per_node: int) -> WeightSource:
    if kind == "peer":
        return PeerWeightSource(gpus_per_node=gpus_per_node, chunk_bytes=3000)
    return HostPoolWeightSource(HostExpertPool.open(Path(tmp) / "pool"))


def _drain(client: EplbClient, sink: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    while not client.outbox.empty():
        sink.append(client.outbox.get_nowait())


def _warm_p2p(group: Any, rank: int, world: int, device: torch.device) -> None:
    import torch.distributed as dist

    ops = []
    for peer in range(world):
        if peer != rank:
            ops.append(dist.P2POp(dist.isend, torch.ones(1, device=device), peer, group=group))
            ops.append(dist.P2POp(dist.irecv, torch.empty(1, device=device), peer, group=group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    torch.cuda.synchronize(device)


def layout_changes(
    rank: int, world: int, tmp: str, *, backend: str, source: str, gpus_per_node: int = 1
) -> dict[str, Any]:
    import torch.distributed as dist

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    group = dist.group.WORLD
    now = [0.0]
    src = _source(source, tmp, gpus_per_node)
    client = EplbClient(
        CFG.num_layers,
        CFG.num_experts,
        NUM_PHYSICAL,
        ep_rank=rank,
        ep_size=world,
        device=device,
        group=group,
        sync_interval=SYNC,
        weight_source=src,
        clock=lambda: now[0],
        top_k=CFG.top_k,
        worker=f"w{rank}",
    )
    gpu = backend == "nccl"
    if gpu and isinstance(src, PeerWeightSource):
        # NCCL sets up each pair's P2P connection at its first transfer, which takes longer
        # than the few steps this script leaves between two prepares: do it up front.
        _warm_p2p(src.group, rank, world, device)
    model = MoEModel(CFG, device)
    engine = EPMoEEngine(model, client, group)
    client.set_schedule(window_steps=6, record_steps=4)
    lay = layouts(world)
    bad = lay[2].clone()
    bad[1][bad[1] == 0] = 1  # expert 0 of layer 1 loses every replica
    last = world - 1
    prepares = {
        3 + 3 * rank: (1, lay[1], 1000.0),
        24 + 2 * rank: (2, bad if rank == 0 else lay[2], 1000.0),
        40 + 3 * rank: (3, lay[3], 1000.0),
        56 + rank: (4, lay[4], 1000.0),
        (90 if rank == last else 70 + rank): (5, lay[5], 8.0),
        92 + 2 * rank: (6, lay[6], 1000.0),
        120 + rank: (7, lay[1] if rank == 0 else lay[7], 1000.0),
    }
    # Odd ranks get epoch 3, and every rank epoch 6, through deliver() (the agent's path).
    agent_path = {(3, r) for r in range(1, world, 2)} | {(6, r) for r in range(world)}
    refused: dict[int, str] = {}
    epochs, errors, tokens = [], [], []
    loads = torch.zeros(STEPS, CFG.num_layers, NUM_PHYSICAL, dtype=torch.int64)
    sink: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for step in range(STEPS):
        now[0] = float(step)
        if step in prepares:
            e, p2l, timeout = prepares[step]
            if (e, rank) in agent_path:
                body = {"group": "default", "epoch": e, "timeout_s": timeout}
                client.deliver("prepare", body, {"phy2log": p2l})
            else:
                try:
                    client.prepare(p2l, e, timeout_s=timeout)
                except PrepareError as err:
                    refused[e] = err.reason
        if step == 58 and rank == 0:
            client.abort(4, "test abort")
        n = 0 if (step + rank) % 7 == 0 else 3 + (step * 5 + rank) % 6  # dummy steps too
        x = model.tokens(step, rank, n)
        epochs.append(client.epoch)
        out = engine.forward(x, step)
        ref = model.reference_forward(x, step)
        errors.append(float((out - ref).abs().max()) if n else 0.0)
        tokens.append(n)
        for layer, phys in enumerate(engine.last_phys):
            if phys.numel():
                loads[step, layer] = torch.bincount(phys.reshape(-1).cpu(), minlength=NUM_PHYSICAL)
        client.step()
        _drain(client, sink)
        if gpu:  # GPU steps take microseconds; leave the staging thread the time CPU steps do
            time.sleep(0.02)
    _drain(client, sink)
    stats = client.stats
    client.close()
    msgs = [(t, b, {k: v.cpu() for k, v in ts.items()}) for t, b, ts in sink]
    return {
        "epochs": epochs,
        "errors": errors,
        "tokens": tokens,
        "loads": loads,
        "msgs": msgs,
        "refused": refused,
        "stats": stats,
        "final_phy2log": client.layout.phy2log,
        "weights_ok": _weights_match(engine, model, client),
    }


def _weights_match(engine: EPMoEEngine, model: MoEModel, client: EplbClient) -> bool:
    S, r = client.slots_per_rank, client.ep_rank
    p2l = client.layout.phy2log
    for layer in range(CFG.num_layers):
        idx = p2l[layer, r * S : (r + 1) * S].to(model.device)
        if not torch.equal(engine.w13[layer], model.w13[layer][idx]):
            return False
        if not torch.equal(engine.w2[layer], model.w2[layer][idx]):
            return False
    return True


def peer_source_direct(rank: int, world: int, tmp: str, *, backend: str) -> dict[str, Any]:
    """PeerWeightSource on its own: every rank gets exactly the experts it asked for, in
    several rounds; then one rank reports it is not ready and every rank gives up."""
    import torch.distributed as dist
    from eplbd_client import FetchRequest
    from eplbd_client._plan import needed_from_outside

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    model = MoEModel(CFG, device)
    src = PeerWeightSource(gpus_per_node=2, chunk_bytes=5000)
    src.bind(ep_rank=rank, ep_size=world, group=dist.group.WORLD, device=device)
    lay = layouts(world)
    old, new = lay[1], lay[2]
    S = NUM_PHYSICAL // world
    weights = {
        layer: [
            w.index_select(0, old[layer, rank * S : (rank + 1) * S].to(device)).contiguous()
            for w in model.expert_weights(layer)
        ]
        for layer in range(CFG.num_layers)
    }
    wanted = needed_from_outside(old, new, rank, world)
    out = {
        (layer, x): [torch.full_like(w[0], float("nan")) for w in weights[layer]]
        for layer, x in wanted
    }
    src.fetch(FetchRequest(3, rank, world, old, new, weights, wanted, out))
    rounds, received = src.rounds_last, src.bytes_received_last
    ok = all(
        torch.equal(got, full[x])
        for (layer, x), bufs in out.items()
        for got, full in zip(bufs, model.expert_weights(layer), strict=True)
    )
    errors = []
    for attempt in range(2):  # the group stays usable after a refused round
        try:
            ready = not (attempt == 0 and rank == world - 1)
            # Not ready: nothing is sent (an empty request is enough); then no change at all.
            after = new if attempt == 0 else old
            src.fetch(FetchRequest(4, rank, world, old, after, weights, [], {}, ready=ready))
            errors.append("")
        except RuntimeError as e:
            errors.append(str(e))
    return {
        "ok": ok,
        "wanted": len(wanted),
        "rounds": rounds,
        "received": received,
        "errors": errors,
    }


SHARE_STEPS = 100


def share_changes(rank: int, world: int, tmp: str, *, backend: str) -> dict[str, Any]:
    """Weighted splits served through EplbClient, each prepared at a different step per rank,
    half of them through deliver() with a ``share`` tensor (the agent's path):

        epoch 1  new placement A, split S1                   -> commits
        epoch 2  A, split S2 (a share-only change)           -> commits, no weights staged
        epoch 3  rank 0 gets a negative share                -> refused there, dropped everywhere
        epoch 4  rank 0 gets A with S1, the others A with S2 -> different layouts: dropped
        epoch 5  A with the equal split (shares only again)  -> commits
    """
    import torch.distributed as dist

    group = dist.group.WORLD
    client = EplbClient(
        CFG.num_layers,
        CFG.num_experts,
        NUM_PHYSICAL,
        ep_rank=rank,
        ep_size=world,
        group=group,
        sync_interval=SYNC,
        weight_source=PeerWeightSource(chunk_bytes=3000),
        top_k=CFG.top_k,
        worker=f"w{rank}",
    )
    model = MoEModel(CFG)
    engine = EPMoEEngine(model, client, group)
    a = layouts(world)[1]
    s1 = random_share(a, CFG.num_experts, 1)
    s2 = random_share(a, CFG.num_experts, 2)
    neg = s2.clone()
    neg[0, 0] = -1
    prepares = {
        3 + 3 * rank: (1, s1),
        25 + 2 * rank: (2, s2),
        45 + rank: (3, neg if rank == 0 else s2),
        60 + 2 * rank: (4, s1 if rank == 0 else s2),
        78 + 3 * rank: (5, None),
    }
    refused: dict[int, str] = {}
    epochs, errors = [], []
    loads = torch.zeros(SHARE_STEPS, CFG.num_layers, NUM_PHYSICAL, dtype=torch.int64)
    sink: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for step in range(SHARE_STEPS):
        if step in prepares:
            e, share = prepares[step]
            if (e + rank) % 2:
                body = {"group": "default", "epoch": e, "timeout_s": 1000.0}
                tensors = {"phy2log": a} if share is None else {"phy2log": a, "share": share}
                client.deliver("prepare", body, tensors)
            else:
                try:
                    client.prepare(a, e, share=share)
                except PrepareError as err:
                    refused[e] = err.reason
        x = model.tokens(step, rank, 4 + (step * 3 + rank) % 5)
        epochs.append(client.epoch)
        out = engine.forward(x, step)
        errors.append(float((out - model.reference_forward(x, step)).abs().max()))
        for layer, phys in enumerate(engine.last_phys):
            if phys.numel():
                loads[step, layer] = torch.bincount(phys.reshape(-1), minlength=NUM_PHYSICAL)
        client.step()
        _drain(client, sink)
    _drain(client, sink)
    stats = client.stats
    client.close()
    return {
        "epochs": epochs,
        "errors": errors,
        "loads": loads,
        "msgs": sink,
        "refused": refused,
        "stats": stats,
        "layout": client.layout,
        "shares": {1: s1, 2: s2},
        "map_bytes": client._log2phy.numel() * 8 + client._logcnt.numel() * 8,
        "weights_ok": _weights_match(engine, model, client),
    }
