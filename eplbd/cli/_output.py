"""How the CLI writes: tables, ``--json``, ``--watch`` lines, colour and heat ramps.

The conventions operators expect from nvidia-smi, kubectl and systemctl:

- a table by default: aligned columns, numbers right-aligned;
- ``--json``: one JSON object with a ``schema_version``, for scripts; under ``--watch`` one
  object per line (:func:`emit_json_line`), flushed, so ``jq`` can follow it;
- colour only when the stream is a terminal, ``NO_COLOR`` is unset (https://no-color.org)
  and the output is not JSON;
- heat maps with the Unicode block ramp `` ▁▂▃▄▅▆▇█``, or the ASCII ramp `` .:-=+*#%@``
  when the stream's encoding is not UTF-8 (or ``--ascii``).

Standard library only: ``eplbd status`` imports this and must start fast.

A subcommand typically does::

    def add_arguments(parser):
        add_output_arguments(parser, watch=True)

    def run(args):
        out = Output.from_args(args)
        if out.json:
            out.emit_json({"groups": [...]})
        else:
            out.table(["group", "epoch", "balance"], rows, title="groups")
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from eplbd._json import finite

__all__ = [
    "ASCII_RAMP",
    "Output",
    "SCHEMA_VERSION",
    "UNICODE_RAMP",
    "add_output_arguments",
    "emit_json",
    "emit_json_line",
    "heat_char",
    "heat_ramp",
    "render_table",
    "style",
    "supports_unicode",
    "use_color",
    "write_file",
]

SCHEMA_VERSION = 1
UNICODE_RAMP = " ▁▂▃▄▅▆▇█"
ASCII_RAMP = " .:-=+*#%@"

_STYLES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


def use_color(
    stream: IO[str] | None = None,
    *,
    json: bool = False,
    environ: Mapping[str, str] | None = None,
    force: bool | None = None,
) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set (any value) and never in JSON.

    ``force`` (``--color``/``--no-color``) overrides the terminal test but not JSON.
    """
    if json:
        return False
    if force is not None:
        return force
    env = os.environ if environ is None else environ
    if "NO_COLOR" in env:
        return False
    s = sys.stdout if stream is None else stream
    isatty = getattr(s, "isatty", None)
    return bool(callable(isatty) and isatty())


def style(text: str, *styles: str, enabled: bool) -> str:
    """Wrap ``text`` in ANSI codes (``"bold"``, ``"red"``...) when ``enabled``."""
    if not enabled or not styles:
        return text
    codes = ";".join(_STYLES[s] for s in styles)
    return f"\x1b[{codes}m{text}\x1b[0m"


def supports_unicode(stream: IO[str] | None = None) -> bool:
    """Whether ``stream``'s encoding is UTF-8 (so the block ramp renders)."""
    s = sys.stdout if stream is None else stream
    encoding = getattr(s, "encoding", None)
    if not encoding:
        return False
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


# ---------------------------------------------------------------------------------------
# tables


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return format(value, float_format)
    return str(value)


def _visible_len(text: str) -> int:
    """Length without ANSI escape sequences (cells may be styled)."""
    n, i = 0, 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            if end != -1:
                i = end + 1
                continue
        n += 1
        i += 1
    return n


def render_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    float_format: str = ".3f",
    align: Sequence[str] | None = None,
    color: bool = False,
) -> str:
    """Aligned columns separated by two spaces; a header line (bold when ``color``).

    A column is right-aligned when every non-empty value in it is a number (``int`` or
    ``float``; ``None`` shows as ``-``), unless ``align`` gives ``"<"``/``">"`` per column.
    Floats use ``float_format``. Returns the text with a trailing newline.
    """
    raw_rows = [list(r) for r in rows]
    ncol = len(headers)
    for r in raw_rows:
        if len(r) != ncol:
            raise ValueError(f"row has {len(r)} cells, table has {ncol} columns: {r!r}")
    if align is None:
        align = [
            ">"
            if any(_is_number(r[c]) for r in raw_rows)
            and all(_is_number(r[c]) or r[c] is None for r in raw_rows)
            else "<"
            for c in range(ncol)
        ]
    cells = [[_cell(v, float_format) for v in r] for r in raw_rows]
    widths = [
        max([_visible_len(headers[c])] + [_visible_len(r[c]) for r in cells]) for c in range(ncol)
    ]

    def line(values: Sequence[str]) -> str:
        parts = []
        for c, v in enumerate(values):
            pad = " " * (widths[c] - _visible_len(v))
            parts.append(pad + v if align[c] == ">" else v + pad)
        return "  ".join(parts).rstrip()

    head = line(list(headers))
    out = [style(head, "bold", enabled=color)]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# json


def _document(obj: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    doc.update(finite(obj))
    return doc


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # numpy arrays and tensors, without importing them
    if callable(tolist):
        return finite(tolist())
    return str(value)


def emit_json(obj: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """Write one JSON document (with ``schema_version``) for ``--json``."""
    s = sys.stdout if stream is None else stream
    s.write(json.dumps(_document(obj), indent=2, default=_json_default, allow_nan=False) + "\n")
    s.flush()


def emit_json_line(obj: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """Write one compact JSON object on one line and flush: the ``--json --watch`` form."""
    s = sys.stdout if stream is None else stream
    text = json.dumps(_document(obj), separators=(",", ":"), default=_json_default, allow_nan=False)
    s.write(text + "\n")
    s.flush()


# ---------------------------------------------------------------------------------------
# heat ramps


def heat_char(value: float, vmin: float, vmax: float, ramp: str = UNICODE_RAMP) -> str:
    """The ramp character for ``value`` on [vmin, vmax].

    ``vmin`` (and below) is the blank first character, ``vmax`` (and above) the last; any
    value above ``vmin`` gets at least the second, so a small load never looks like none.
    NaN shows as ``?``.
    """
    if math.isnan(value):
        return "?"
    top = len(ramp) - 1
    if value <= vmin:
        return ramp[0]
    if value >= vmax or vmax <= vmin:
        return ramp[top]
    frac = (value - vmin) / (vmax - vmin)
    return ramp[max(1, min(top, math.ceil(frac * top)))]


def heat_ramp(
    values: Iterable[float],
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    ascii: bool | None = None,
    stream: IO[str] | None = None,
) -> str:
    """One character per value: a row of a heat map.

    ``vmin`` defaults to min(0, values) (loads start at zero, so an even load is a full row,
    not a blank one), ``vmax`` to the largest value. ``ascii=None`` picks the ASCII ramp when
    ``stream`` (default stdout) is not UTF-8.
    """
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    lo = min([0.0, *finite]) if vmin is None else vmin
    hi = max(finite, default=0.0) if vmax is None else vmax
    if ascii is None:
        ascii = not supports_unicode(stream)
    ramp = ASCII_RAMP if ascii else UNICODE_RAMP
    return "".join(heat_char(v, lo, hi, ramp) for v in vals)


# ---------------------------------------------------------------------------------------
# files


def write_file(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (``-o FILE``): into a temporary file in
    the same directory, flushed and fsynced, then renamed over ``path``, so a failed write (a
    full disk) leaves the old file as it was and no temporary file behind. Raises OSError."""
    import tempfile  # here: it pulls in random and shutil, and eplbd status must start fast

    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        # a device or a pipe (-o /dev/stdout): nothing to replace; write through
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    target = os.path.realpath(path)  # through a symlink, as a plain write goes
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
    else:  # what open() would create: mkstemp's file is 0600
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=os.path.dirname(target)
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------
# the bundle a subcommand uses


def add_output_arguments(parser: argparse.ArgumentParser, *, watch: bool = False) -> None:
    """``--json``, ``--ascii``, ``--color/--no-color`` and (optionally) ``--watch [SECONDS]``."""
    parser.add_argument("--json", action="store_true", help="JSON output with a schema_version")
    parser.add_argument("--ascii", action="store_true", help="ASCII heat ramps only")
    parser.add_argument(
        "--color",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force colour on or off (default: on a terminal, unless NO_COLOR is set)",
    )
    if watch:
        parser.add_argument(
            "--watch",
            nargs="?",
            type=float,
            const=2.0,
            default=None,
            metavar="SECONDS",
            help="refresh every SECONDS (default 2); with --json, one object per line",
        )


class Output:
    """A stream plus the decisions made once: JSON or not, colour or not, Unicode or not."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        json: bool = False,
        color: bool | None = None,
        ascii: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.json = json
        self.color = use_color(self.stream, json=json, environ=environ, force=color)
        self.unicode = supports_unicode(self.stream) if ascii is None else not ascii

    @classmethod
    def from_args(cls, args: argparse.Namespace, stream: IO[str] | None = None) -> Output:
        return cls(
            stream,
            json=bool(getattr(args, "json", False)),
            color=getattr(args, "color", None),
            ascii=True if getattr(args, "ascii", False) else None,
        )

    def write(self, text: str) -> None:
        self.stream.write(text)

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def style(self, text: str, *styles: str) -> str:
        return style(text, *styles, enabled=self.color)

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        title: str | None = None,
        float_format: str = ".3f",
        align: Sequence[str] | None = None,
    ) -> None:
        if title:
            self.line(self.style(title, "bold"))
        self.write(
            render_table(headers, rows, float_format=float_format, align=align, color=self.color)
        )

    def heat(
        self, values: Iterable[float], *, vmin: float | None = None, vmax: float | None = None
    ) -> str:
        return heat_ramp(values, vmin=vmin, vmax=vmax, ascii=not self.unicode)

    def emit_json(self, obj: Mapping[str, Any]) -> None:
        emit_json(obj, self.stream)

    def emit_json_line(self, obj: Mapping[str, Any]) -> None:
        emit_json_line(obj, self.stream)

    def flush(self) -> None:
        self.stream.flush()
