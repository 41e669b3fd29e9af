"""What can go wrong on the simulated exchange, on demand.

Times are *ticks*: the number of finest-interval candles since the replay started
(tick 10 of a 1m replay is 10 simulated minutes in). REST faults count klines requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultPlan:
    drop_at: list[int] = field(default_factory=list)
    """Ticks at which every websocket connection is cut (TCP abort, no close frame)."""
    shutdown_at: list[int] = field(default_factory=list)
    """Ticks at which every connection gets ``serverShutdown``, then is closed after ``shutdown_grace_s``."""
    shutdown_grace_s: float = 0.5
    silence: list[tuple[int, int]] = field(default_factory=list)
    """Tick ranges [a, b) in which no market message is sent (connections stay open)."""
    silence_streams: list[str] | None = None
    """Streams the silence applies to (e.g. ``btcusdt@kline_1m``); None: all of them."""
    duplicate_every: int = 0
    """Send every N-th closed-candle message twice (0: never)."""
    late_every: int = 0
    """Every N ticks, resend a closed candle from ``late_by`` ticks ago (0: never)."""
    late_by: int = 3
    out_of_order_at: list[int] = field(default_factory=list)
    """Ticks whose closed-candle messages are sent after those of the next tick."""
    malformed_at: list[int] = field(default_factory=list)
    """Ticks at which a malformed JSON text is sent on every connection."""
    impossible_at: list[int] = field(default_factory=list)
    """Ticks at which an impossible candle (high < low) precedes the real one."""
    max_connection_age_s: float | None = None
    """Real seconds after which the server closes a connection (Binance: 24 h)."""
    ping_interval_s: float = 20.0
    pong_timeout_s: float = 60.0
    rest_429_at: list[int] = field(default_factory=list)
    """Klines requests (1-based count) answered 429 with ``Retry-After``."""
    rest_500_at: list[int] = field(default_factory=list)
    """Klines requests answered 500."""
    retry_after_s: int = 1
    rest_weight_limit: int = 6000
    """REQUEST_WEIGHT allowed per real minute before 429s."""
