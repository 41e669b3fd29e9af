"""The checkpoint position, with no Redis: what a checkpoint is, and how far it may go.

A checkpoint is a snapshot of the indicator state plus the id of the last ``klines.v1`` entry
folded into it; it never passes a candle still waiting for its key's warm-up, so a replay from
it covers that candle. ``checkpoint`` keeps them in Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.bus.framing import entry_id_before, entry_id_key

id_key = entry_id_key


@dataclass
class Checkpoint:
    snapshot: bytes
    entry_id: str  # last klines.v1 entry folded into the snapshot
    # Per key with state, the open time of the first candle folded into it (``feature_origin``).
    # None: written by a build that did not record origins; its keys' origins are unknown.
    origins: dict[tuple[str, str], int | None] | None = None


def before_oldest_waiting(entry_id: str, waiting_first_ids) -> str:
    """``entry_id``, or earlier: just before the oldest candle still waiting for its key's
    warm-up, so a replay from it covers that candle."""
    firsts = list(waiting_first_ids)
    if not firsts:
        return entry_id
    return min(entry_id, entry_id_before(min(firsts, key=id_key)), key=id_key)


