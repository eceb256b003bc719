"""Offline vLLM driver for the tests, run with the vLLM virtual environment's Python:
``python driver.py SPEC.json``. Not part of eplbd.

SPEC: ``{"model": DIR, "tp": 1|2, "ep": bool, "eplb": {EPLBConfig fields} | null,
"max_tokens": N, "out": FILE, "control": FILE | null, "deadline_s": S, "pace_s": S,
"phases": [NAME, ...]}``; a phase's prompts are ``tinymoe.prompts(NAME)``.

- ``"control"`` null: generate every phase's prompts once, write one JSON line
  ``{"phase", "prompts", "outputs"}`` per phase.
- otherwise, rounds: read the control file (a phase name, or ``stop``), generate that
  phase's prompts, ask every worker about its EPLB state (:func:`probe.worker_state`),
  append ``{"round", "phase", "outputs", "workers"}`` to ``out``, sleep ``pace_s`` (CPU
  for the eplbd daemons on a small machine); until ``stop`` or the deadline.

Each output is ``[token ids, log-probabilities of those tokens]`` (greedy, float32).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _outputs(llm: Any, prompts: list[str], max_tokens: int) -> list[list[list[Any]]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    out = []
    for o in llm.generate(prompts, sp, use_tqdm=False):
        c = o.outputs[0]
        ids = list(c.token_ids)
        out.append([ids, [float(lp[t].logprob) for lp, t in zip(c.logprobs, ids, strict=True)]])
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from vllm import LLM

    kw: dict[str, Any] = {}
    if spec.get("ep"):
        kw["enable_expert_parallel"] = True
    if spec.get("eplb") is not None:
        kw.update(enable_eplb=True, eplb_config=spec["eplb"])
    llm = LLM(
        model=spec["model"],
        tensor_parallel_size=spec["tp"],
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=32 << 20,
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
        **kw,
    )
    import probe
    import tinymoe

    out = Path(spec["out"])
    control = spec.get("control")
    max_tokens = int(spec["max_tokens"])
    prompts = {phase: tinymoe.prompts(phase) for phase in spec["phases"]}
    if control is None:
        with out.open("w") as f:
            for phase, ps in prompts.items():
                res = _outputs(llm, ps, max_tokens)
                f.write(json.dumps({"phase": phase, "prompts": ps, "outputs": res}) + "\n")
        return

    deadline = time.monotonic() + float(spec["deadline_s"])
    with out.open("w", buffering=1) as f:
        for rnd in range(1_000_000):
            phase = Path(control).read_text().strip()
            if phase == "stop" or time.monotonic() > deadline:
                break
            res = _outputs(llm, prompts[phase], max_tokens)
            workers = llm.collective_rpc(probe.worker_state)
            line = {"round": rnd, "phase": phase, "outputs": res, "workers": workers}
            f.write(json.dumps(line) + "\n")
            time.sleep(float(spec.get("pace_s", 0.0)))


if __name__ == "__main__":
    main()
