"""The planner daemon's settings: one frozen dataclass, filled by :func:`eplbd.ops.load`.

Sources, lowest first: the defaults below < the TOML file (``--config``, top-level keys or a
``[planner]`` table) < ``EPLBD_PLANNER_<FIELD>`` then ``EPLBD_<FIELD>`` < ``--field-name``
flags. A bad value fails at start with the field named (exit code 78).

Embedded in an agent (one process per node), :meth:`PlannerSettings.embedded` binds ipc
sockets under the agent's runtime directory instead of TCP:
``ipc://<runtime-dir>/planner.sock`` (control) and ``ipc://<runtime-dir>/planner-snapshots.sock``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from eplbd.ops import settings as cfg

if TYPE_CHECKING:
    from eplbd.controller._core import CoreConfig
    from eplbd.planner import CostModel

__all__ = [
    "EMBEDDED_CONTROL_SOCKET",
    "EMBEDDED_SNAPSHOT_SOCKET",
    "PlannerSettings",
    "check_planner_settings",
    "snapshot_endpoint_for",
]

EMBEDDED_CONTROL_SOCKET = "planner.sock"
EMBEDDED_SNAPSHOT_SOCKET = "planner-snapshots.sock"


_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")  # eplbd.planner's cost model


def parse_expert_shape(value: Any) -> tuple[int, int] | None:
    """``"H,F"`` (hidden size, expert intermediate size) -> (H, F); None or "" -> None.
    Raises ValueError with the expected form."""
    if value is None or value == "":
        return None
    parts = str(value).replace(" ", "").split(",")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise ValueError(
        f"{value!r}: expected HIDDEN,INTERMEDIATE (two positive integers, e.g. 7168,2048)"
    )


def _check_expert_shape(value: Any) -> None:
    parse_expert_shape(value)


def _check_metrics(value: Any) -> None:
    if value is None or value == "":
        return
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: expected HOST:PORT (port 0 for any free port)")


@dataclass(frozen=True)
class PlannerSettings:
    """Everything ``eplbd planner`` can be told (see the table in docs/daemons.md)."""

    ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_PLANNER_", "EPLBD_")
    CONFIG_SECTION: ClassVar[str | None] = "planner"

    listen: str = cfg.setting(
        "tcp://127.0.0.1:7050",
        help="control endpoint to bind (ROUTER: agents and the CLI)",
        check=cfg.check_endpoint("tcp", "ipc"),
    )
    snapshot_listen: str | None = cfg.setting(
        None,
        help="snapshot endpoint to bind (PULL); default: the control port + 1, or "
        "planner-snapshots.sock next to an ipc control socket",
        check=cfg.check_endpoint("tcp", "ipc"),
    )
    state_dir: Path = cfg.setting(
        Path("/var/lib/eplbd"),
        help="directory of the persistent state (epochs, layouts, history)",
        check=cfg.check_path(directory=True),
    )
    reset_state: bool = cfg.setting(
        False,
        help="move unreadable state files aside (<file>.corrupt-<time>) instead of refusing "
        "to start",
    )
    curve_keys: Path | None = cfg.setting(
        None,
        help="CURVE key directory: planner.key_secret plus allowed/*.key (clients' public keys)",
        check=cfg.check_path(directory=True),
    )
    curve_secret: Path | None = cfg.setting(
        None, help="CURVE secret key file (default: <curve-keys>/planner.key_secret)"
    )
    curve_allow_dir: Path | None = cfg.setting(
        None, help="directory of allowed client public keys (default: <curve-keys>/allowed)"
    )
    insecure: bool = cfg.setting(
        False, help="allow binding a non-loopback tcp address without CURVE keys"
    )
    metrics: str | None = cfg.setting(
        "127.0.0.1:9470",
        help="HOST:PORT of the Prometheus /metrics endpoint (empty: off)",
        check=_check_metrics,
    )
    log_level: str = cfg.setting(
        "info", help="log level", choices=("debug", "info", "warning", "error")
    )
    log_format: str = cfg.setting(
        "auto",
        help="log format: json lines, console, or auto (json unless on a terminal)",
        choices=("auto", "json", "console"),
    )
    tick_s: float = cfg.setting(
        0.1, help="main loop tick: timers, deadlines, windows", min=0.005, max=5.0
    )
    heartbeat_s: float = cfg.setting(
        1.0,
        help="heartbeat interval of the agents (stale after 3, dead after 5 missed) and of "
        "the planner",
        min=0.01,
        max=600.0,
    )
    window_s: float = cfg.setting(
        10.0, help="seconds of load per window (one forecast update)", min=0.01
    )
    windows: int = cfg.setting(6, help="windows kept in the sliding window", min=1, max=10_000)
    ewma_alpha: float = cfg.setting(
        0.3, help="weight of the newest window in the forecast", min=0.001, max=1.0
    )
    forecast: str = cfg.setting(
        "ewma",
        help="the load the planner plans for: ewma (a weighted average of the windows, "
        "ewma_alpha) or regime (the mean of the windows since the traffic last changed, by "
        "a switch or a drift, and a drift's recent windows while it goes on: the same time "
        "with far fewer moves where traffic holds a mix for a while and then switches)",
        choices=("ewma", "regime"),
    )
    change_threshold: float = cfg.setting(
        10.0,
        help="forecast regime: a window whose dispersion against the mean is above this "
        "many times its usual level starts a new regime",
        min=1.5,
        max=1e6,
    )
    regime_windows: int = cfg.setting(
        360,
        help="forecast regime: the most windows the mean holds in full (older ones fade as "
        "in an average of weight 1/N)",
        min=2,
        max=1_000_000,
    )
    window_save_s: float = cfg.setting(
        60.0,
        help="seconds between writes of the load windows and forecast to the state directory "
        "(restored at start; also written at a clean stop; 0: at every closed window)",
        min=0.0,
    )
    min_gain: float = cfg.setting(
        0.05,
        help="per-layer balance gain (max/mean GPU load, e.g. 1.30 -> 1.25) worth a move; "
        "with objective time, in modelled time over the ideal mean (0.05: 5% of a step)",
        min=0.0,
    )
    cooldown_s: float = cfg.setting(
        300.0, help="seconds between the end of a rebalance and the next automatic one", min=0.0
    )
    min_windows: int = cfg.setting(
        3, help="windows of data before the first automatic rebalance", min=1
    )
    min_tokens: int = cfg.setting(
        1, help="tokens in the sliding window before an automatic rebalance", min=0
    )
    max_moves_per_rank: int = cfg.setting(
        0, help="slots one rank may receive per epoch (0: no cap)", min=0
    )
    max_moves: int = cfg.setting(0, help="slots moved per epoch in a group (0: no cap)", min=0)
    staging_bytes: int = cfg.setting(
        0,
        help="staging memory per rank in bytes; with expert_bytes it caps the moves per rank",
        min=0,
    )
    expert_bytes: int = cfg.setting(
        0,
        help="bytes of one expert's weights in one layer (for staging_bytes, and the bytes "
        "eplbd layout diff reports)",
        min=0,
    )
    prepare_timeout_s: float = cfg.setting(
        60.0, help="seconds for every rank to stage a prepared layout", min=0.01, max=1e6
    )
    commit_timeout_s: float = cfg.setting(
        60.0,
        help="seconds for the flip to be reported once every rank staged",
        min=0.01,
        max=1e6,
    )
    rejoin_grace_s: float = cfg.setting(
        10.0,
        help="seconds the workers of a restarted agent have to re-register before a commit in "
        "flight counts them lost (0: at once)",
        min=0.0,
        max=1e6,
    )
    keep_layouts: int = cfg.setting(
        16, help="committed layouts kept per group (rollback targets)", min=1, max=4096
    )
    keep_history: int = cfg.setting(
        256, help="attempts kept in each group's history", min=1, max=1_000_000
    )
    objective: str = cfg.setting(
        "tokens",
        help="what the planner balances: tokens (rows per GPU) or time (modelled GPU time "
        "per step, from the cost model: needs expert_shape or cost_model)",
        choices=("tokens", "time"),
    )
    expert_shape: str | None = cfg.setting(
        None,
        help="HIDDEN,INTERMEDIATE of one expert (e.g. 7168,2048): the default cost model "
        "(weights read at memory bandwidth, tiles of rows at peak FLOP/s) when no "
        "cost_model file is given; with one, must match it",
        check=_check_expert_shape,
    )
    expert_dtype: str = cfg.setting(
        "bfloat16", help="dtype of the expert weights (default cost model)", choices=_DTYPES
    )
    cost_model: Path | None = cfg.setting(
        None,
        help="cost model JSON measured by benchmarks/bench_cost_model.py on the serving GPUs "
        "(time objective and the modelled time metrics)",
        check=cfg.check_path(exists=True),
    )

    # --- derived ---------------------------------------------------------------------------

    def load_cost_model(self) -> CostModel | None:
        """The cost model these settings describe: the ``cost_model`` file, else the default
        model of ``expert_shape``, else None. Raises :class:`eplbd.ops.ConfigError` naming
        the setting at fault."""
        from eplbd.planner import CostModel, default_cost_model

        shape = parse_expert_shape(self.expert_shape)
        if self.cost_model is not None:
            try:
                model = CostModel.from_json(self.cost_model.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise cfg.ConfigError("cost_model", f"{self.cost_model}: {e}") from None
            measured = (model.hidden, model.ffn)
            if shape is not None and None not in measured and measured != shape:
                raise cfg.ConfigError(
                    "expert_shape",
                    f"{shape[0]},{shape[1]} but {self.cost_model} was measured for "
                    f"{model.hidden},{model.ffn}",
                )
            return model
        if shape is None:
            return None
        return default_cost_model(shape[0], shape[1], self.expert_dtype)

    def core_config(self) -> CoreConfig:
        """The core's rules from these settings (imports torch: the core needs it)."""
        from eplbd.controller._core import CoreConfig
        from eplbd.controller._trigger import TriggerPolicy

        per_rank = self.max_moves_per_rank
        if self.staging_bytes > 0 and self.expert_bytes > 0:
            fit = self.staging_bytes // self.expert_bytes
            per_rank = fit if per_rank == 0 else min(per_rank, fit)
            per_rank = max(per_rank, 1)  # unchecked settings only: fit >= 1 once checked
        return CoreConfig(
            objective=self.objective,
            cost_model=self.load_cost_model(),
            window_s=self.window_s,
            num_windows=self.windows,
            ewma_alpha=self.ewma_alpha,
            forecast=self.forecast,
            change_threshold=self.change_threshold,
            regime_windows=self.regime_windows,
            window_save_s=self.window_save_s,
            policy=TriggerPolicy(
                min_gain=self.min_gain,
                cooldown_s=self.cooldown_s,
                min_windows=self.min_windows,
                min_tokens=self.min_tokens,
                max_moves_per_rank=per_rank,
                max_moves=self.max_moves,
            ),
            prepare_timeout_s=self.prepare_timeout_s,
            commit_timeout_s=self.commit_timeout_s,
            heartbeat_s=self.heartbeat_s,
            expert_bytes=self.expert_bytes,
            rejoin_grace_s=self.rejoin_grace_s,
        )

    @property
    def snapshot_endpoint(self) -> str:
        return self.snapshot_listen or snapshot_endpoint_for(self.listen)

    @property
    def curve_paths(self) -> tuple[Path, Path] | None:
        """(secret file, allow-list dir), or None without CURVE."""
        if self.curve_keys is None and self.curve_secret is None:
            return None
        base = self.curve_keys
        secret = self.curve_secret or (base / "planner.key_secret" if base else None)
        allow = self.curve_allow_dir or (base / "allowed" if base else None)
        if secret is None or allow is None:
            return None
        return secret, allow

    @classmethod
    def embedded(
        cls, runtime_dir: Path | str, state_dir: Path | str, **overrides: Any
    ) -> PlannerSettings:
        """Settings for a planner inside an agent process: ipc sockets under ``runtime_dir``,
        no metrics endpoint of its own (the agent serves one), then ``overrides``."""
        rd = Path(runtime_dir)
        s = cls(
            listen=f"ipc://{rd / EMBEDDED_CONTROL_SOCKET}",
            snapshot_listen=f"ipc://{rd / EMBEDDED_SNAPSHOT_SOCKET}",
            state_dir=Path(state_dir),
            metrics=None,
        )
        s = replace(s, **overrides)
        check_planner_settings(s)
        return s


def snapshot_endpoint_for(listen: str) -> str:
    """The default snapshot endpoint: tcp port + 1 (``:0`` / ``:*`` stay ephemeral), or
    ``planner-snapshots.sock`` in the directory of an ipc control socket. Raises ValueError
    (port 65535 has no port + 1)."""
    if listen.startswith("tcp://"):
        host, _, port = listen[len("tcp://") :].rpartition(":")
        if port in ("0", "*"):
            return f"tcp://{host}:{port}"
        if int(port) >= 65535:  # no port + 1: the bind (or connect) could never succeed
            raise ValueError(f"{listen!r}: the control port + 1 is above 65535")
        return f"tcp://{host}:{int(port) + 1}"
    if listen.startswith("ipc://"):
        path = Path(listen[len("ipc://") :])
        return f"ipc://{path.parent / EMBEDDED_SNAPSHOT_SOCKET}"
    raise ValueError(f"unsupported endpoint {listen!r}")


def _is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_planner_settings(s: PlannerSettings) -> None:
    """Rules across fields (raise :class:`eplbd.ops.ConfigError` naming the field)."""
    cfg.validate(s)
    try:
        snap = s.snapshot_endpoint
        if s.snapshot_listen is None:  # derived from listen: its ipc path may be too long
            cfg.check_endpoint("tcp", "ipc")(snap)
    except ValueError as e:
        raise cfg.ConfigError(
            "listen", f"no default snapshot endpoint ({e}): set snapshot_listen, or change listen"
        ) from None
    if snap == s.listen and not s.listen.endswith((":0", ":*")):
        raise cfg.ConfigError("snapshot_listen", f"same endpoint as listen ({snap})")
    if s.min_windows > s.windows:
        # the sliding window never holds more than `windows`: no automatic rebalance, ever
        raise cfg.ConfigError(
            "min_windows",
            f"{s.min_windows} is more than windows ({s.windows}), so no automatic rebalance "
            "would ever start (to stop them, use eplbd freeze)",
        )
    if 0 < s.staging_bytes < s.expert_bytes:
        # not one expert fits: the cap would have to be 0 moves, i.e. no rebalance at all
        raise cfg.ConfigError(
            "staging_bytes",
            f"{s.staging_bytes} is less than expert_bytes ({s.expert_bytes}): not even one "
            "expert fits in the staging memory",
        )
    if s.objective == "time" and s.expert_shape in (None, "") and s.cost_model is None:
        raise cfg.ConfigError(
            "objective",
            "time needs a cost model: set expert_shape (HIDDEN,INTERMEDIATE) or cost_model",
        )
    if s.cost_model is not None or s.expert_shape not in (None, ""):
        s.load_cost_model()  # a bad file or a shape that contradicts it fails at start
    if s.curve_keys is None and (s.curve_secret is None) != (s.curve_allow_dir is None):
        # one half of CURVE alone would otherwise serve without CURVE
        missing = "curve_allow_dir" if s.curve_allow_dir is None else "curve_secret"
        raise cfg.ConfigError(
            missing, "CURVE needs both curve_secret and curve_allow_dir (or curve_keys)"
        )
    paths = s.curve_paths
    if paths is not None:
        secret, allow = paths
        if not secret.is_file():
            raise cfg.ConfigError("curve_secret", f"CURVE secret key file {secret} not found")
        if not allow.is_dir():
            raise cfg.ConfigError("curve_allow_dir", f"allow-list directory {allow} not found")
    elif not s.insecure:
        for field, ep in (("listen", s.listen), ("snapshot_listen", snap)):
            if ep.startswith("tcp://"):
                host = ep[len("tcp://") :].rpartition(":")[0]
                if not _is_loopback(host):
                    raise cfg.ConfigError(
                        field,
                        f"{ep} is not loopback: give --curve-keys, or --insecure to accept "
                        "unauthenticated peers",
                    )
