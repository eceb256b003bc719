"""The one exception of the wire layer, with a short machine-readable reason code."""

from __future__ import annotations

__all__ = ["REASONS", "WireError"]

#: Every reason code :class:`WireError` may carry (also the keys of the bad-message counters).
REASONS: frozenset[str] = frozenset(
    {
        # framing (decode)
        "truncated",  # fewer than the 4 header frames
        "bad_protocol",  # frame 0 is not b"EPLBD"
        "bad_version",  # frame 1 is not the supported protocol version byte
        "bad_type",  # frame 2 is not a short ASCII name
        "unknown_type",  # frame 2 names no message type of this protocol version
        "bad_body",  # frame 3 is not a msgpack map with string keys
        "bad_schema",  # body["schema"] missing, not an int, or < 1
        "bad_tensor_spec",  # body["tensors"] malformed (names, dtypes, shapes)
        "bad_dtype",  # a tensor dtype outside the allowed set, or wrong for its field
        "frame_count",  # number of tensor frames differs from body["tensors"]
        "tensor_size",  # a tensor frame's length disagrees with dtype x shape
        "too_large",  # the message exceeds the size limit
        # content (validate)
        "missing_field",  # a required body field is absent
        "bad_field",  # a body field has the wrong type or is out of range
        "missing_tensor",  # a required tensor is absent
        "bad_shape",  # a tensor's shape is wrong (for the registered model)
        "bad_count",  # a load count is negative, non-finite or larger than possible
        "bad_layout",  # a phy2log id outside [0, E)
        "model_mismatch",  # a hello disagrees with the registered model shape
        # ordering (SequenceTracker / EpochTracker)
        "replay",  # a sequence number already seen from this incarnation
        "stale_epoch",  # an epoch not newer than the last one accepted
        "stale_incarnation",  # a message from an incarnation that has been replaced
    }
)


class WireError(ValueError):
    """A message (or its frames) is malformed, out of range or out of order.

    ``reason`` is one of :data:`REASONS` (a short code for counters and error replies);
    ``detail`` is a human-readable sentence naming the offending field. The receiver counts
    the message under ``reason``, logs it with its sender, and drops it.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown WireError reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
