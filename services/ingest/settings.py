"""Settings of the ingest service (live websocket, REST backfill, history, archive)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from libs.common.klines import INTERVAL_MS
from libs.common.settings import ServiceSettings, parse_csv_list
from services.ingest.rules import CONNECTION_LIFETIME_S, MAX_STREAMS_PER_CONNECTION

# The 25 coins of our users' setups (seeds/004: "Supported Cryptocurrencies (25 coins)"), with
# POLUSDT in place of the seed's MATICUSDT: Binance migrated MATIC to POL in September 2024 and
# ended MATICUSDT spot trading, so that stream no longer delivers candles; POLUSDT is the pair.
# Likewise DOTUSDT in place of XMRUSDT, which Binance delisted in February 2024.
DEFAULT_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT",
    "ADAUSDT", "AVAXUSDT", "DOGEUSDT", "LINKUSDT", "POLUSDT",
    "LTCUSDT", "UNIUSDT", "ATOMUSDT", "DOTUSDT", "NEARUSDT",
    "ARBUSDT", "OPUSDT", "APTUSDT", "SUIUSDT", "PEPEUSDT",
    "SHIBUSDT", "ICPUSDT", "ETCUSDT", "FILUSDT", "AAVEUSDT",
)  # fmt: skip


class IngestSettings(ServiceSettings):
    binance_ws_url: str = Field(
        "wss://stream.binance.com:9443",
        description="Websocket base URL (Binance or the simulator); /stream and /ws are appended.",
    )
    binance_rest_url: str = Field(
        "https://api.binance.com", description="REST base URL (Binance or the simulator); /api/v3/... appended."
    )
    # NoDecode: the env value is 'A,B,C' (or a JSON list), parsed by _csv, not JSON-decoded first.
    symbols: Annotated[list[str], NoDecode] = Field(list(DEFAULT_SYMBOLS), description="Symbols to ingest, e.g. BTCUSDT,ETHUSDT.")
    intervals: Annotated[list[str], NoDecode] = Field(["1m", "15m", "1h"], description="Kline intervals, Binance spelling.")
    publish_live: bool = Field(False, description="Also publish in-progress updates to klines-live.v1.")
    live_maxlen: int = Field(10_000, gt=0, description="Cap on the klines-live.v1 stream (XADD MAXLEN ~).")
    archive_url: str = Field("", description="Parquet archive root (folder or fsspec URL); default <data_dir>/archive.")
    history_base_url: str = Field(
        "https://data.binance.vision", description="Base URL of Binance's public kline archive (history import)."
    )
    streams_per_connection: int = Field(
        200, gt=0, description="Streams per websocket connection (Binance allows at most 1024)."
    )
    rotate_after_s: float = Field(
        23 * 3600.0, gt=0, description="Open a replacement connection after this long (Binance cuts at 24 h)."
    )
    silence_timeout_s: float = Field(
        30.0, gt=0, description="A connection with no message for this long is treated as dead and replaced."
    )
    reconnect_initial_s: float = Field(1.0, gt=0, description="First reconnect delay (then doubled, with jitter).")
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay.")
    initial_backfill_candles: int = Field(
        1000,
        ge=0,
        description=(
            "A stream with no published candle yet (first deployment, a newly added symbol or interval) "
            "starts with this many of its newest closed candles over REST, before its first live one "
            "(indicator warm-up); 0: start with the first live candle."
        ),
    )
    rest_weight_budget: int = Field(
        3000, gt=0, description="REST weight per minute we allow ourselves (Binance's limit is 6000)."
    )

    @field_validator("symbols", "intervals", mode="before")
    @classmethod
    def _csv(cls, v: object) -> object:
        return parse_csv_list(v)

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, v: list[str]) -> list[str]:
        out = [s.strip().upper() for s in v]
        bad = [s for s in out if not s.isalnum()]
        if bad or not out:
            raise ValueError(f"must be a non-empty list of alphanumeric symbols, got {v!r}")
        return list(dict.fromkeys(out))

    @field_validator("intervals")
    @classmethod
    def _intervals(cls, v: list[str]) -> list[str]:
        bad = [i for i in v if i not in INTERVAL_MS]
        if bad or not v:
            raise ValueError(f"unknown interval(s) {bad}; Binance intervals are {', '.join(INTERVAL_MS)}")
        return list(dict.fromkeys(v))

    @field_validator("binance_ws_url")
    @classmethod
    def _ws(cls, v: str) -> str:
        if not v.startswith(("ws://", "wss://")):
            raise ValueError(f"must start with ws:// or wss://, got {v!r}")
        return v.rstrip("/")

    @field_validator("binance_rest_url", "history_base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("streams_per_connection")
    @classmethod
    def _per_connection(cls, v: int) -> int:
        if v > MAX_STREAMS_PER_CONNECTION:
            raise ValueError(f"must be at most {MAX_STREAMS_PER_CONNECTION} (Binance's streams per connection), got {v}")
        return v

    @field_validator("rotate_after_s")
    @classmethod
    def _rotate(cls, v: float) -> float:
        if v >= CONNECTION_LIFETIME_S:
            raise ValueError(
                f"must be below {CONNECTION_LIFETIME_S:.0f} (Binance cuts a connection after 24 h), got {v:g}"
            )
        return v

    @field_validator("reconnect_max_s")
    @classmethod
    def _reconnect_max(cls, v: float, info: ValidationInfo) -> float:
        initial = info.data.get("reconnect_initial_s")  # absent when it failed its own check
        if initial is not None and v < initial:
            raise ValueError(f"must be at least KLINEBUS_RECONNECT_INITIAL_S ({initial:g}), got {v:g}")
        return v

    def archive_root(self) -> str:
        return self.archive_url or str(self.data_dir / "archive")
