"""The bus edge: Redis Streams with klinebus's conventions, split by concern.

* ``framing``: one ``__data__`` field of JSON per entry; batch decoding; clients.
* ``guard``: ``OncePerCandle``, the once-per-candle publish guard (one script call per batch).
* ``failures``: bad input / infrastructure / domain bug, classified once; back-off and stall state.
* ``consuming``: a subscription's batch: decode, handle, dead-letter, one fenced XACK.
* ``ordered``: ordered consumers (lease-owned groups, recovery of pending entries first).
* ``competing``: competing consumers (work queues, reclaim of a dead replica's entries).
* ``deadletters``: ``dead-letters.v1`` writes that raise when Redis refuses them.
* ``groups``: group creation at the last acknowledged position, the ownership lease, stale consumers.
* ``monitor``: lag, pending, oldest pending age, trimmed-before-consumed; the bus metrics.
* ``core``: ``Bus``, what a service holds of all that.

See docs/bus.md for the guarantees and the operator's view.
"""

from libs.common.bus.consuming import READ_BATCH
from libs.common.bus.core import Bus
from libs.common.bus.failures import HANDLER_ATTEMPTS, RETRY_FIRST_S, RETRY_MAX_S, classify
from libs.common.bus.framing import (
    BAD_INPUT_ERRORS,
    DATA_FIELD,
    PlainJSONFormat,
    is_cluster_url,
    one_line,
    redis_client,
)
from libs.common.bus.framing import entry_id_key as id_key
from libs.common.bus.groups import LeaseLost, OwnerLease, position_key
from libs.common.bus.guard import LAST_OPEN_TIME, OncePerCandle, candle_field

__all__ = [
    "BAD_INPUT_ERRORS",
    "DATA_FIELD",
    "HANDLER_ATTEMPTS",
    "LAST_OPEN_TIME",
    "READ_BATCH",
    "RETRY_FIRST_S",
    "RETRY_MAX_S",
    "Bus",
    "LeaseLost",
    "OncePerCandle",
    "OwnerLease",
    "PlainJSONFormat",
    "candle_field",
    "classify",
    "id_key",
    "is_cluster_url",
    "one_line",
    "position_key",
    "redis_client",
]
