"""Declarative daemon settings: defaults < config file < environment < command-line flags.

A daemon declares one frozen dataclass whose fields are made with :func:`setting`. The same
declaration gives the argparse flags, the environment variable names, the config-file keys,
the validation, the start-up printout and the reference table in the docs, so the four can
never disagree.

Example (what ``eplbd agent`` does)::

    from dataclasses import dataclass
    from pathlib import Path
    from typing import ClassVar

    from eplbd.ops import settings as cfg

    @dataclass(frozen=True)
    class AgentSettings:
        ENV_PREFIXES: ClassVar[tuple[str, ...]] = ("EPLBD_AGENT_", "EPLBD_")
        CONFIG_SECTION: ClassVar[str | None] = "agent"

        planner: str | None = cfg.setting(
            None, help="planner control endpoint", check=cfg.check_endpoint("tcp", "ipc"))
        runtime_dir: Path = cfg.setting(
            Path("/run/eplbd"), help="directory of the ipc sockets",
            check=cfg.check_path(absolute=True))
        window_steps: int = cfg.setting(256, help="steps per recording window", min=1)
        log_level: str = cfg.setting(
            "info", help="log level", choices=("debug", "info", "warning", "error"))
        curve_secret: str | None = cfg.setting(None, help="CURVE secret key", secret=True)

    def add_arguments(parser):            # eplbd/cli/agent_cmd.py
        cfg.add_arguments(parser, AgentSettings)

    def run(args):
        try:
            settings = cfg.load(AgentSettings, args)
        except cfg.ConfigError as exc:
            print(f"eplbd agent: {exc}", file=sys.stderr)
            return cfg.EXIT_CONFIG         # 78: systemd does not restart
        log.info("settings", **cfg.describe(settings))

Where each value comes from:

- default: the ``setting(default, ...)`` value (or ``default_factory``);
- config file: ``--config FILE`` or ``$<PREFIX>CONFIG`` (TOML). Keys are the field names
  (``window_steps``; ``window-steps`` is accepted too). Top-level keys apply to every daemon;
  a table named ``CONFIG_SECTION`` (``[agent]``) applies to this one and wins. The other
  tables of :data:`CONFIG_SECTIONS` belong to other programs and are skipped; any other
  table, and an unknown key outside them, is an error (a typo). A class may read files its
  own way with a ``values_from_config(data, where) -> dict`` static method (the CLI does:
  it reads the daemons' files for their addresses);
- environment: ``<PREFIX><FIELD>`` for each prefix of ``ENV_PREFIXES`` in order (the first
  found wins), e.g. ``EPLBD_AGENT_WINDOW_STEPS`` then ``EPLBD_WINDOW_STEPS``; a field may
  name its own variable with ``env=``. A variable under the daemon's own prefix (the first,
  when it is not the shared ``EPLBD_``) that names no field is an error: it is a typo. A
  shared name that would look like another daemon's (``EPLBD_PLANNER_SNAPSHOTS`` for the
  agent's ``planner_snapshots``) is not read (see :data:`RESERVED_PREFIXES`);
- flags: ``--window-steps`` (``flag=`` overrides the name). Booleans get ``--x/--no-x``.

Strings from the environment and flags are parsed by the field's type: ``str``, ``int``,
``float`` (finite only), ``bool`` (1/0, true/false, yes/no, on/off), ``pathlib.Path``,
``X | None`` (an empty string means None), and ``tuple[T, ...]`` (comma-separated; a TOML
array in the file). Every value, defaults included, then passes ``min``/``max``/``choices``
and the field's ``check`` callables; the first failure raises :class:`ConfigError` naming the
field and the source of the value.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from eplbd.ops.exits import EXIT_CONFIG

__all__ = [
    "CONFIG_SECTIONS",
    "ConfigError",
    "EXIT_CONFIG",
    "SettingSpec",
    "add_arguments",
    "check_endpoint",
    "check_path",
    "describe",
    "env_names",
    "load",
    "read_table",
    "reference_markdown",
    "setting",
    "sources",
    "specs",
    "validate",
]

T = TypeVar("T")
Check = Callable[[Any], None]

#: The tables a config file may hold: one per program (``[agent]``, ``[planner]``, ``[cli]``,
#: and the vLLM plugin's ``[vllm]``). A table named otherwise is a typo, and an error,
#: whichever program reads the file.
CONFIG_SECTIONS: tuple[str, ...] = ("agent", "cli", "planner", "vllm")

#: The daemons' own environment prefixes. A shared ``EPLBD_<FIELD>`` name that starts with
#: one of them is never read (it would be ambiguous in the shared /etc/default/eplbd).
RESERVED_PREFIXES: tuple[str, ...] = ("EPLBD_AGENT_", "EPLBD_PLANNER_")

_META_KEY = "eplbd.setting"
_SOURCES_ATTR = "_eplbd_setting_sources"
_MISSING: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """An invalid setting. ``field`` names it, ``source`` says where the bad value came from
    (``default``, ``file PATH``, ``env NAME``, ``flag --name``)."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting {field}{where}: {message}")


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """Everything :func:`setting` recorded about one field, plus its resolved type."""

    name: str
    type: Any
    default: Any
    help: str
    env: str | None
    flag: str | None
    min: float | None
    max: float | None
    choices: tuple[Any, ...] | None
    checks: tuple[Check, ...]
    secret: bool
    shown_default: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | None = None,
    env: str | None = None,
    flag: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: Iterable[Any] | None = None,
    check: Check | Sequence[Check] | None = None,
    secret: bool = False,
    shown_default: str | None = None,
) -> Any:
    """Declare a settings field (use as the dataclass field's default).

    ``min``/``max`` are inclusive bounds for numbers; ``choices`` the allowed values;
    ``check`` one or more callables that raise ``ValueError`` with a message for a bad value
    (see :func:`check_endpoint`, :func:`check_path`); ``secret`` hides the value in
    :func:`describe`; ``env`` replaces the derived variable name; ``flag`` the derived
    ``--field-name``; ``shown_default`` describes a ``default_factory`` value in help and
    docs ("the host name") instead of this machine's.
    """
    if default is _MISSING and default_factory is None:
        raise TypeError("a setting needs a default (settings are optional by design)")
    checks: tuple[Check, ...]
    if check is None:
        checks = ()
    elif callable(check):
        checks = (check,)
    else:
        checks = tuple(check)
    meta = {
        _META_KEY: {
            "help": help,
            "env": env,
            "flag": flag,
            "min": min,
            "max": max,
            "choices": None if choices is None else tuple(choices),
            "checks": checks,
            "secret": secret,
            "shown_default": shown_default,
        }
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------
# checks


_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])$")
_IPC_MAX = 107


def check_endpoint(*schemes: str) -> Check:
    """A ZeroMQ endpoint: ``tcp://HOST:PORT`` (HOST a name, address, ``[v6]`` or ``*``;
    PORT 1-65535, 0 or ``*`` for an ephemeral bind), ``ipc://PATH`` (at most 107 bytes) or
    ``inproc://NAME``. ``schemes`` limits the accepted ones (default: tcp and ipc)."""
    allowed = schemes or ("tcp", "ipc")

    def check(value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, str) or "://" not in value:
            raise ValueError(f"{value!r} is not an endpoint like tcp://host:port")
        scheme, rest = value.split("://", 1)
        if scheme not in allowed:
            raise ValueError(f"scheme {scheme!r} not allowed here (use {', '.join(allowed)})")
        if scheme == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not host or not _HOST_RE.match(host):
                raise ValueError(f"{value!r}: expected tcp://HOST:PORT")
            if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
                raise ValueError(f"{value!r}: port must be 0-65535 or *")
        elif scheme == "ipc":
            if not rest:
                raise ValueError(f"{value!r}: empty ipc path")
            if len(rest.encode()) > _IPC_MAX:
                raise ValueError(f"ipc path longer than {_IPC_MAX} bytes: {rest!r}")
        elif not rest:
            raise ValueError(f"{value!r}: empty {scheme} address")

    return check


def check_path(*, absolute: bool = False, exists: bool = False, directory: bool = False) -> Check:
    """A filesystem path: optionally absolute, existing, and a directory (when it exists)."""

    def check(value: Any) -> None:
        if value is None:
            return
        paths = value if isinstance(value, tuple) else (value,)
        for p in paths:
            p = Path(p)
            if str(p) in ("", "."):
                raise ValueError("empty path")
            if absolute and not p.is_absolute():
                raise ValueError(f"{str(p)!r} must be an absolute path")
            if exists and not p.exists():
                raise ValueError(f"{str(p)!r} does not exist")
            if directory and p.exists() and not p.is_dir():
                raise ValueError(f"{str(p)!r} is not a directory")

    return check


# ---------------------------------------------------------------------------------------
# introspection


def specs(cls: type) -> list[SettingSpec]:
    """The settings of a dataclass made with :func:`setting`, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        if f.name == "config":
            raise TypeError("a setting may not be called 'config' (that is --config FILE)")
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()  # type: ignore[misc,operator]
        else:  # pragma: no cover - setting() forbids it
            raise TypeError(f"{f.name} has no default")
        out.append(SettingSpec(name=f.name, type=hints[f.name], default=default, **meta))
    return out


def _prefixes(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "ENV_PREFIXES", ("EPLBD_",)))


def env_names(cls: type, spec: SettingSpec) -> list[str]:
    """The environment variables read for ``spec``, most specific first.

    A shared name that would fall under a daemon's own prefix is not offered: the agent's
    ``planner_snapshots`` is read from ``EPLBD_AGENT_PLANNER_SNAPSHOTS`` only, never from
    ``EPLBD_PLANNER_SNAPSHOTS``, which belongs to the planner daemon.
    """
    if spec.env:
        return [spec.env]
    prefixes = _prefixes(cls)
    reserved = (*RESERVED_PREFIXES, prefixes[0]) if prefixes else RESERVED_PREFIXES
    names = []
    for i, p in enumerate(prefixes):
        name = p + spec.name.upper()
        if i > 0 and name.startswith(reserved):
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------
# parsing


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported settings type {tp!r}")
        return args[0], optional
    return tp, False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _scalar(tp: Any, raw: Any, from_text: bool) -> Any:
    """Convert one value to ``tp``. ``from_text``: raw is a string from env or a flag."""
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_text and isinstance(raw, str):
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if from_text and isinstance(raw, str):
            try:
                return int(raw.strip().replace("_", ""), 0)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {raw!r}")
    if tp is float:
        if isinstance(raw, bool):
            raise ValueError(f"expected a number, got {raw!r}")
        if isinstance(raw, int | float):
            value = float(raw)
        elif from_text and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {raw!r}") from None
        else:
            raise ValueError(f"expected a number, got {raw!r}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {raw!r}")
        return value
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"expected a string, got {raw!r}")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if isinstance(raw, str | Path):
            return Path(raw)
        raise ValueError(f"expected a path, got {raw!r}")
    raise TypeError(f"unsupported settings type {tp!r}")


def _convert(spec: SettingSpec, raw: Any, from_text: bool) -> Any:
    tp, optional = _unwrap_optional(spec.type)
    if raw is None or (optional and from_text and isinstance(raw, str) and raw.strip() == ""):
        if optional:
            return None
        raise ValueError("a value is required")
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported settings type {tp!r} (use tuple[T, ...])")
        if from_text and isinstance(raw, str):
            items: list[Any] = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, list | tuple):
            items = list(raw)
        else:
            raise ValueError(f"expected a list, got {raw!r}")
        return tuple(_scalar(args[0], item, from_text) for item in items)
    return _scalar(tp, raw, from_text)


def _check(spec: SettingSpec, value: Any) -> None:
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if spec.choices is not None and v not in spec.choices:
            raise ValueError(f"{v!r} is not one of {', '.join(map(repr, spec.choices))}")
        if isinstance(v, int | float) and not isinstance(v, bool):
            if spec.min is not None and v < spec.min:
                raise ValueError(f"{v!r} is below the minimum {spec.min!r}")
            if spec.max is not None and v > spec.max:
                raise ValueError(f"{v!r} is above the maximum {spec.max!r}")
    for check in spec.checks:
        check(value)


# ---------------------------------------------------------------------------------------
# argparse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one flag per setting to ``parser``.

    Flags default to "not given" (``argparse.SUPPRESS``) so that :func:`load` can tell a
    flag from a default; the help text shows the default and the environment variable.
    """
    group = parser.add_argument_group("settings (flag > environment > config file > default)")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML config file (env {_prefixes(cls)[0]}CONFIG)",
    )
    for spec in specs(cls):
        default = "none" if spec.default is None else _show(spec.default)
        if spec.shown_default is not None:
            default = spec.shown_default
        extra = f" (default: {'***' if spec.secret and spec.default else default}; "
        extra += f"env {env_names(cls, spec)[0]})"
        tp, _ = _unwrap_optional(spec.type)
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = spec.name.upper()
            if spec.choices is not None and typing.get_origin(tp) is not tuple:
                kwargs["metavar"] = "{" + ",".join(str(c) for c in spec.choices) + "}"
        group.add_argument(spec.flag_name, help=spec.help + extra, **kwargs)


# ---------------------------------------------------------------------------------------
# loading


def _read_file(cls: type, path: str, source: str) -> tuple[dict[str, Any], str]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}", source) from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}", source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}", source) from None
    except RecursionError:  # a = [[[[...: the parser gives up; a bad file, exit 78
        raise ConfigError(
            "config", f"{path} is not valid TOML: nested too deeply", source
        ) from None
    where = f"file {path}"
    for key, value in data.items():
        if isinstance(value, dict) and key not in CONFIG_SECTIONS:
            tables = ", ".join(f"[{t}]" for t in CONFIG_SECTIONS)
            raise ConfigError(key, f"unknown table [{key}] (tables: {tables})", where)
    reader = getattr(cls, "values_from_config", None)
    if reader is not None:  # a program that reads other programs' files its own way
        values: dict[str, Any] = reader(data, where)
        return values, where
    section = getattr(cls, "CONFIG_SECTION", None)
    values = read_table(cls, data, "", where, top_level=True)
    if section is not None and isinstance(data.get(section), dict):
        values.update(read_table(cls, data[section], section + ".", where))
    return values, where


def read_table(
    cls: type, table: Mapping[str, Any], prefix: str, where: str, *, top_level: bool = False
) -> dict[str, Any]:
    """The settings of ``cls`` in one table of a config file (``prefix``: ``"agent."`` for
    error messages). An unknown key, or a table inside a program's table, is a ConfigError;
    at the top level the programs' tables are skipped."""
    known = {s.name for s in specs(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            if not top_level:
                raise ConfigError(prefix + key, "unexpected table", where)
            continue  # a program's table: the caller reads its own
        if name not in known:
            raise ConfigError(prefix + key, "unknown setting", where)
        values[name] = value
    return values


def load(
    cls: type[T],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build and validate a ``cls`` from defaults, the config file, ``environ`` and ``args``.

    ``args`` is the namespace from a parser prepared with :func:`add_arguments` (or a plain
    mapping of field name to value, e.g. in tests; ``"config"`` names the file). ``environ``
    defaults to ``os.environ``. Raises :class:`ConfigError`; the caller exits with
    :data:`EXIT_CONFIG`.
    """
    env = os.environ if environ is None else environ
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    all_specs = specs(cls)
    known = {s.name for s in all_specs}
    prefixes = _prefixes(cls)

    own = prefixes[0] if prefixes and prefixes[0] != "EPLBD_" else None
    if own is not None:
        claimed = {n for s in all_specs for n in env_names(cls, s)} | {own + "CONFIG"}
        for name in sorted(env):
            if name.startswith(own) and name not in claimed:
                field = name[len(own) :].lower()
                raise ConfigError(field, "unknown environment variable", f"env {name}")

    raw: dict[str, tuple[Any, str, bool]] = {}  # name -> (value, source, from_text)

    config_path = given.get("config")
    config_source = "flag --config"
    if config_path is None:
        for p in prefixes:
            if env.get(p + "CONFIG"):
                config_path, config_source = env[p + "CONFIG"], f"env {p}CONFIG"
                break
    if config_path:
        file_values, where = _read_file(cls, str(config_path), config_source)
        for name, value in file_values.items():
            raw[name] = (value, where, False)

    for spec in all_specs:
        for var in env_names(cls, spec):
            if var in env:
                raw[spec.name] = (env[var], f"env {var}", True)
                break

    for name, value in given.items():
        if name in known:
            spec = next(s for s in all_specs if s.name == name)
            raw[name] = (value, f"flag {spec.flag_name}", isinstance(value, str))

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for spec in all_specs:
        if spec.name in raw:
            value, source, from_text = raw[spec.name]
            try:
                values[spec.name] = _convert(spec, value, from_text)
            except ValueError as exc:
                raise ConfigError(spec.name, _hide(spec, str(exc), value), source) from None
        else:
            values[spec.name], source = spec.default, "default"
        origin[spec.name] = source
        try:
            _check(spec, values[spec.name])
        except ValueError as exc:
            message = _hide(spec, str(exc), values[spec.name])
            raise ConfigError(spec.name, message, source) from None
    instance = cls(**values)
    with contextlib.suppress(AttributeError, TypeError):  # a slots dataclass has no room
        object.__setattr__(instance, _SOURCES_ATTR, origin)
    return instance


def _hide(spec: SettingSpec, message: str, value: Any) -> str:
    """A secret's value never reaches an error message (which ends up in the journal)."""
    if not spec.secret or value in (None, ""):
        return message
    for shown in {repr(value), repr(str(value)), str(value)}:
        message = message.replace(shown, "***")
    return message


def validate(instance: Any) -> None:
    """Check an instance built directly (``Settings(x=1)``), e.g. in tests or embedding code."""
    for spec in specs(type(instance)):
        value = getattr(instance, spec.name)
        try:
            _check(spec, value)
        except ValueError as exc:
            raise ConfigError(spec.name, _hide(spec, str(exc), value), "value") from None


def sources(instance: Any) -> dict[str, str]:
    """Where each value of a :func:`load` result came from (empty if built directly)."""
    return dict(getattr(instance, _SOURCES_ATTR, {}))


def _show(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_show(v) for v in value]
    return value


def describe(instance: Any) -> dict[str, Any]:
    """The settings as a JSON-friendly dict for the start-up log line; secrets as ``***``."""
    out: dict[str, Any] = {}
    for spec in specs(type(instance)):
        value = getattr(instance, spec.name)
        out[spec.name] = "***" if spec.secret and value not in (None, "") else _show(value)
    return out


def reference_markdown(cls: type) -> str:
    """A Markdown table of every setting (flag, environment, default, meaning) for the docs."""
    lines = [
        "| setting (file key) | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in specs(cls):
        tp, _ = _unwrap_optional(spec.type)
        default = "—" if spec.default is None else f"`{_show(spec.default)}`"
        if spec.shown_default is not None:
            default = spec.shown_default
        if spec.secret and spec.default:
            default = "(secret)"
        meaning = spec.help
        if spec.choices is not None:
            meaning += " (one of " + ", ".join(f"`{c}`" for c in spec.choices) + ")"
        bounds = []
        if spec.min is not None:
            bounds.append(f"≥ {spec.min}")
        if spec.max is not None:
            bounds.append(f"≤ {spec.max}")
        if bounds:
            meaning += " (" + ", ".join(bounds) + ")"
        flag = spec.flag_name if tp is not bool else f"{spec.flag_name} / --no-{spec.flag_name[2:]}"
        envs = " or ".join(f"`{n}`" for n in env_names(cls, spec))
        lines.append(f"| `{spec.name}` | `{flag}` | {envs} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"
