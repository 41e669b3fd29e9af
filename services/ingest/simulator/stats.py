"""What the simulator counted, for tests and benchmarks to assert on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimulatorStats:
    connections_opened: int = 0
    connections_closed_by_server: int = 0
    pings_sent: int = 0
    pongs_ok: int = 0
    pongs_bad: int = 0
    subscribe_requests: int = 0
    rate_limit_disconnects: int = 0
    messages_sent: int = 0
    rest_requests: int = 0
    rest_429: int = 0
    rest_418: int = 0
    rest_500: int = 0
    error_replies: int = 0
    connections_per_path: dict[str, int] = field(default_factory=dict)
