"""Harness of the vLLM plugin tests: vLLM's CPU build in its own virtual environment
(``scripts/vllm-venv``), the tiny MoE model, the offline driver and ``vllm serve`` as
processes, the output comparison. Test-only; the files vLLM's processes import are in
``tests/vllm/`` (the TEST-ONLY CPU shim among them).

Every vLLM process runs in its own session and is killed with its process group; every wait
has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_DIR = ROOT / "tests" / "vllm"
VENV = ROOT / ".venv-vllm"

#: Float32 log-probabilities of the same tokens agree to about 4e-6 between vLLM TP=1 and
#: TP=2 with expert parallelism (the partial sums are added in another order); a wrong expert
#: or a wrong weight changes them by far more than this.
LOGPROB_TOL = 1e-4

#: eplbd settings for runs of a minute: short windows, an automatic rebalance once two
#: windows of data are in, little cooldown; liveness that tolerates two cores kept busy by
#: vLLM (a peer is dead after 10 s of silence, not 2.5 s as in tests/_e2e.py).
PLANNER: dict[str, Any] = {
    "min_windows": 2,
    "min_tokens": 1,  # tests/_e2e.py's PLANNER_FAST keeps automatic rebalances off with it
    "cooldown_s": 1.0,
    "window_s": 0.5,
    "windows": 4,
    "heartbeat_s": 2.0,
}
AGENT: dict[str, Any] = {"heartbeat_s": 1.0, "dead_timeout_s": 10.0}

Outputs = list[list[list[Any]]]  # per prompt: [token ids, log-probabilities]


def _tinymoe() -> Any:
    """tests/vllm/tinymoe.py, loaded by path: that directory is not put on this process's
    sys.path (its dist-info aliases are for vLLM's processes only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinymoe", VLLM_DIR / "tinymoe.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: The hot experts of each prompt phase of the tiny model.
HOT: dict[str, tuple[int, ...]] = dict(_tinymoe().HOT)


def ensure_venv() -> Path:
    """The vLLM venv's python, made by ``scripts/vllm-venv`` if needed (minutes, once)."""
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "vllm-venv")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise RuntimeError(f"scripts/vllm-venv failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    if r.stdout.strip():
        print(r.stdout.strip())
    return VENV / "bin" / "python"


def vllm_env(tp: int, **extra: str) -> dict[str, str]:
    """The environment of a vLLM process: no EPLBD_* of ours unless given, nothing reaching
    out (offline hub, no usage stats, loopback only), the test modules and the CPU shim on
    the path, one core per worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPLBD_", "VLLM_"))}
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(VLLM_DIR),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_TARGET_DEVICE="cpu",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # LLM.collective_rpc(probe.worker_state)
        VLLM_CPU_OMP_THREADS_BIND="|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)),
    )
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def build_model(python: Path, out: Path) -> Path:
    subprocess.run(
        [str(python), str(VLLM_DIR / "tinymoe.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
        env=vllm_env(1),
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_equal(got: Outputs, want: Outputs, what: str) -> None:
    """Same tokens, log-probabilities within :data:`LOGPROB_TOL`."""
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, ((ids, lps), (rids, rlps)) in enumerate(zip(got, want, strict=True)):
        assert ids == rids, f"{what}, prompt {i}: tokens {ids} != TP=1 tokens {rids}"
        worst = max(abs(a - b) for a, b in zip(lps, rlps, strict=True))
        assert worst <= LOGPROB_TOL, f"{what}, prompt {i}: log-probability differs by {worst}"


def eplbd_status(runtime_dir: Path, *, cli: bool = False) -> dict[str, Any] | None:
    """The planner's status data, or None if it does not answer: with ``cli``, from
    ``eplbd status --runtime-dir DIR --json`` (the operator command, a process); otherwise
    from the same request in this process (:class:`PlannerClient`, what the command sends).

    While vLLM's workers keep both cores busy, a new Python process was seen to make no
    progress through its imports for over 60 s (CI, and here under load; cause not found),
    so the polling during generation stays in this process and the command runs once vLLM
    has stopped. A hung command prints its stacks (SIGABRT with PYTHONFAULTHANDLER)."""
    if not cli:
        from eplbd.cli._client import CliError, PlannerClient

        try:
            with PlannerClient(f"ipc://{runtime_dir}/planner.sock", timeout_s=30.0) as c:
                return c.status("status")
        except CliError as e:
            print(f"status request failed: {e}", flush=True)  # shown on a failure
            return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    env["PYTHONFAULTHANDLER"] = "1"
    with subprocess.Popen(
        [sys.executable, "-m", "eplbd", "status", "--runtime-dir", str(runtime_dir), "--json"]
        + ["--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as p:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=30)
            raise AssertionError(f"eplbd status hung for 120 s; its stacks:\n{err}") from None
    if p.returncode != 0:
        print(f"eplbd status exited {p.returncode}: {err}", flush=True)  # shown on a failure
        return None
    return json.loads(out)  # type: ignore[no-any-return]


def group_status(runtime_dir: Path, group: str) -> dict[str, Any] | None:
    st = eplbd_status(runtime_dir)
    if st is None:
        return None
    return next((g for g in st.get("groups", []) if g.get("group") == group), None)


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


@dataclass
class VllmProcess:
    """A vLLM process tree (offline driver or ``vllm serve``) in its own process group, so
    it is signalled as one, in the test's session, at the test's priority.

    Not in its own session: with the kernel's autogroup scheduling (on here and in CI), a new
    session is a new scheduling group that competes with the test's session as a whole, and
    nice then only ranks tasks inside a group. So placed, vLLM's two busy workers left the
    test's session almost no CPU for minutes (a fresh ``import torch`` waited 872 s on the run
    queue; an agent took 270 s to restart; a SIGKILLed one was not reaped in 10 s). In the
    test's session the same import took 1.2 s beside running vLLM. Not niced either: at nice
    10 beside two busy loops vLLM got about 10% of a core and served no round in 300 s."""

    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], log: Path) -> VllmProcess:
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(log.parent),
                process_group=0,
            )
        return cls(p, log)

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(x[:300] for x in lines[-n:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise AssertionError(f"vLLM exited with {self.popen.returncode}:\n{self.tail()}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"vLLM did not exit within {timeout_s} s:\n{self.tail()}"
            ) from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(30)


@dataclass
class Driver:
    """``tests/vllm/driver.py`` generating rounds of one phase's prompts (see its docstring);
    the test picks the phase and stops it through the control file."""

    proc: VllmProcess
    out: Path
    control: Path
    check: Callable[[dict[str, Any]], None]
    seen: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        python: Path,
        workdir: Path,
        name: str,
        spec: dict[str, Any],
        env: dict[str, str],
        check: Callable[[dict[str, Any]], None],
    ) -> Driver:
        """``check`` is called on every round as it is read (a failed check stops the wait
        at once)."""
        out, control = workdir / f"{name}.jsonl", workdir / f"{name}.control"
        control.write_text(spec.pop("phase", "a"))
        spec = {**spec, "out": str(out), "control": str(control)}
        spec_file = workdir / f"{name}.json"
        spec_file.write_text(json.dumps(spec))
        argv = [str(python), str(VLLM_DIR / "driver.py"), str(spec_file)]
        return cls(VllmProcess.start(argv, env, workdir / f"{name}.log"), out, control, check)

    def phase(self, name: str) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(name)
        tmp.replace(self.control)

    def rounds(self) -> list[dict[str, Any]]:
        """Every round written so far (complete lines)."""
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]
        for line in lines[len(self.seen) :]:
            r = json.loads(line)
            self.check(r)
            self.seen.append(r)
        return self.seen

    def wait_rounds(
        self, pred: Callable[[list[dict[str, Any]]], Any], timeout_s: float, what: str
    ) -> Any:
        def check() -> Any:
            rs = self.rounds()
            v = pred(rs)
            if not v:
                self.proc.check_alive()
            return v

        return wait_for(check, timeout_s, f"{what}\n{self.proc.tail()}", every_s=0.2)

    def stop(self, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        self.phase("stop")
        rc = self.proc.wait(timeout_s)
        assert rc == 0, f"driver exited with {rc}:\n{self.proc.tail()}"
        return self.rounds()


def run_reference(python: Path, model: Path, workdir: Path, phases: list[str]) -> dict[str, Any]:
    """vLLM TP=1 without expert parallelism: {phase: {"prompts", "outputs"}}."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "reference.jsonl"
    spec = {"model": str(model), "tp": 1, "ep": False, "eplb": None, "phases": phases}
    spec.update(max_tokens=8, out=str(out), control=None)
    (workdir / "reference.json").write_text(json.dumps(spec))
    argv = [str(python), str(VLLM_DIR / "driver.py"), str(workdir / "reference.json")]
    proc = VllmProcess.start(argv, vllm_env(1), workdir / "reference.log")
    try:
        rc = proc.wait(600)
    finally:
        proc.kill()
    assert rc == 0, f"reference run failed ({rc}):\n{proc.tail()}"
    return {d["phase"]: d for d in map(json.loads, out.read_text().splitlines())}


@contextlib.contextmanager
def serve(
    python: Path, model: Path, workdir: Path, args: list[str], env: dict[str, str]
) -> Iterator[str]:
    """``vllm serve MODEL ARGS`` on a free loopback port; yields its base URL once it
    answers, kills it afterwards."""
    port = free_port()
    argv = [str(python), "-m", "vllm.entrypoints.cli.main", "serve", str(model)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *args]
    proc = VllmProcess.start(argv, env, workdir / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            proc.check_alive()
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for(up, 300, f"vllm serve on {url}\n{proc.tail()}")
        yield url
    finally:
        proc.kill()


def complete(url: str, prompts: list[str], max_tokens: int) -> Outputs:
    """One OpenAI-style completion request (greedy, log-probabilities of the chosen tokens,
    tokens as ids); the outputs in prompt order."""
    body = {
        "model": "tiny",
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": 1,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
    }
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        reply = json.loads(r.read())
    out: Outputs = []
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
        lp = choice["logprobs"]
        ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        out.append([ids, [float(x) for x in lp["token_logprobs"]]])
    return out
