"""eplbd_client: the library an inference engine embeds in each EP rank.

See docs/integration.md. The engine constructs one :class:`EplbClient` per rank, registers its
slot-major expert weights, routes through :meth:`EplbClient.map_and_record` (or hands
:meth:`EplbClient.layer_state` to its own kernel) and calls :meth:`EplbClient.step` once per
forward step on every rank.
"""

from __future__ import annotations

from eplbd_client._client import EplbClient, LayerState, PrepareError
from eplbd_client._messages import Schedule
from eplbd_client._pool import HostExpertPool
from eplbd_client._sources import (
    FetchRequest,
    HostPoolWeightSource,
    PeerWeightSource,
    WeightSource,
)

__all__ = [
    "EplbClient",
    "FetchRequest",
    "HostExpertPool",
    "HostPoolWeightSource",
    "LayerState",
    "PeerWeightSource",
    "PrepareError",
    "Schedule",
    "WeightSource",
]
