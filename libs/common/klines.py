"""One ``Kline`` type, and readers from Binance's formats into it.

Binance speaks klines in three shapes we read: the 12-column CSV of
data.binance.vision (with or without a header; millisecond timestamps until
2025, microseconds for spot files since), the REST ``/api/v3/klines`` array,
and the websocket ``kline`` event. Everything downstream sees ``Kline``.
"""

from __future__ import annotations

import gzip
import io
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson

# Binance's interval spellings (GET /api/v3/exchangeInfo, "Kline/Candlestick chart intervals").
INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,
    "1w": 604_800_000,
}

# data.binance.vision switched spot kline files to microseconds on 2025-01-01;
# any epoch value above this is read as µs (ms timestamps stay below it until year 5138).
_MICROSECOND_THRESHOLD = 10**14

CSV_COLUMNS = (
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "count",
    "taker_buy_volume",
    "taker_buy_quote_volume",
    "ignore",
)


# How far a candle's open may lie past now (plus one interval) before it is refused as from
# the future: generous for clock skew between us and the exchange, tight enough that a
# corrupt timestamp cannot become the "last" candle and block every real one after it.
FUTURE_SLACK_MS = 5 * 60_000


def now_ms() -> int:
    """Wall-clock time in the unit of every timestamp here: integer ms since the epoch, UTC."""
    return time.time_ns() // 1_000_000


class InvalidKline(ValueError):
    """A kline that cannot be real; ``reason`` is one line fit for a dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def interval_ms(interval: str) -> int:
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise InvalidKline(
            f"unknown interval {interval!r}; Binance intervals are {', '.join(INTERVAL_MS)}"
        ) from None


@dataclass(frozen=True, slots=True)
class Kline:
    symbol: str
    interval: str
    open_time: int
    close_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float = 0.0
    trades: int = 0
    taker_buy_base: float = 0.0
    taker_buy_quote: float = 0.0
    closed: bool = True

    @property
    def key(self) -> tuple[str, str, int]:
        """The identity every consumer is idempotent on."""
        return (self.symbol, self.interval, self.open_time)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar, so a shallow read is the same dict as dataclasses.asdict, which
        # deep-copies each value (11 us against 1 us; ingest builds one KlineEvent per closed candle
        # from this, 4,000 at once when as many streams close together).
        return {name: getattr(self, name) for name in _KLINE_FIELD_NAMES}


_KLINE_FIELD_NAMES = tuple(Kline.__dataclass_fields__)


def validate_kline(k: Kline) -> Kline:
    """Return ``k`` if it can be a real candle, else raise ``InvalidKline``.

    Reads attributes only, so any object shaped like a ``Kline`` (``KlineEvent``) is checked in
    place. Every event on klines.v1 passes here once per consumer, so the usual case is one
    chained comparison; the reason is worked out only for a candle that fails it.
    """
    span = INTERVAL_MS.get(k.interval)
    o, h, lo, c = k.open, k.high, k.low, k.close
    # NaN fails every comparison and inf fails ``< _INF``, so finite positive prices pass only.
    if (
        span is not None
        and 0 < lo <= o <= h < _INF
        and lo <= c <= h
        and 0 <= k.volume < _INF
        and 0 <= k.quote_volume < _INF
        and 0 <= k.taker_buy_base < _INF
        and 0 <= k.taker_buy_quote < _INF
        and 0 <= k.trades <= MAX_INT64
        and 0 <= k.open_time
        and k.close_time - k.open_time == span - 1
        and k.open_time <= now_ms() + span + FUTURE_SLACK_MS
        and k.symbol
        and k.symbol.isalnum()
        and k.symbol == k.symbol.upper()
    ):
        return k
    raise InvalidKline(_why_invalid(k))


_INF = math.inf
MAX_INT64 = (1 << 63) - 1  # JSON numbers every consumer (orjson, Java, Go) can hold


def _why_invalid(k: Kline) -> str:
    """The first rule ``k`` breaks, in one line (checked in the order an operator reads them)."""
    where = f"{k.symbol} {k.interval} open_time={k.open_time}"
    if not k.symbol or k.symbol != k.symbol.upper() or not k.symbol.isalnum():
        return f"{where}: symbol must be upper-case alphanumeric, got {k.symbol!r}"
    if k.interval not in INTERVAL_MS:
        return f"unknown interval {k.interval!r}; Binance intervals are {', '.join(INTERVAL_MS)}"
    prices = {"open": k.open, "high": k.high, "low": k.low, "close": k.close}
    for name, value in prices.items():
        if not math.isfinite(value) or value <= 0:
            return f"{where}: {name} must be a positive finite price, got {value!r}"
    for name, value in (
        ("volume", k.volume),
        ("quote_volume", k.quote_volume),
        ("taker_buy_base", k.taker_buy_base),
        ("taker_buy_quote", k.taker_buy_quote),
    ):
        if not math.isfinite(value) or value < 0:
            return f"{where}: {name} must be finite and >= 0, got {value!r}"
    if not 0 <= k.trades <= MAX_INT64:
        return f"{where}: trades must be in [0, 2^63), got {k.trades}"
    if k.high < k.low:
        return f"{where}: high {k.high} < low {k.low}"
    if k.high < max(k.open, k.close) or k.low > min(k.open, k.close):
        return f"{where}: open/close outside [low, high] (o={k.open} h={k.high} l={k.low} c={k.close})"
    if k.open_time < 0:
        return f"{where}: open_time must be >= 0"
    if k.close_time <= k.open_time:
        return f"{where}: close_time {k.close_time} <= open_time {k.open_time}"
    span = INTERVAL_MS[k.interval]
    # Binance's close_time is open_time + interval - 1 ms. open_time itself need not sit on the
    # interval grid: after the 2018-02-08 outage Binance served 1h candles opening off the hour.
    if k.close_time - k.open_time != span - 1:
        return f"{where}: close_time - open_time is {k.close_time - k.open_time} ms, a {k.interval} candle spans {span - 1}"
    return f"{where}: open_time is in the future"


def _ms(value: Any) -> int:
    t = int(value)
    return t // 1000 if t > _MICROSECOND_THRESHOLD else t


def _float(value: Any, default: float = 0.0) -> float:
    if value is None or value == "":
        return default
    return float(value)


def _int(value: Any, default: int = 0) -> int:
    if value is None or value == "":
        return default
    return int(float(value))


def kline_from_row(row: list[Any] | tuple[Any, ...], symbol: str, interval: str) -> Kline:
    """One Binance kline array (CSV row or REST ``/api/v3/klines`` element), validated."""
    if not isinstance(row, (list, tuple)):  # a REST answer is JSON: any element may be anything
        raise InvalidKline(f"{symbol} {interval}: kline row is a {type(row).__name__}, not an array")
    if len(row) < 7:
        raise InvalidKline(f"{symbol} {interval}: kline row has {len(row)} fields, need at least 7")
    try:
        k = Kline(
            symbol=symbol,
            interval=interval,
            open_time=_ms(row[0]),
            open=float(row[1]),
            high=float(row[2]),
            low=float(row[3]),
            close=float(row[4]),
            volume=float(row[5]),
            close_time=_ms(row[6]),
            quote_volume=_float(row[7]) if len(row) > 7 else 0.0,
            trades=_int(row[8]) if len(row) > 8 else 0,
            taker_buy_base=_float(row[9]) if len(row) > 9 else 0.0,
            taker_buy_quote=_float(row[10]) if len(row) > 10 else 0.0,
            closed=True,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(float("1e999"))
        raise InvalidKline(f"{symbol} {interval}: unreadable kline row {list(row)[:7]!r}: {exc}") from None
    return validate_kline(k)


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".zip"):
        zf = zipfile.ZipFile(path)
        members = [m for m in zf.namelist() if m.lower().endswith(".csv")]
        if len(members) != 1:
            raise InvalidKline(f"{path}: expected exactly one CSV inside the zip, found {members}")
        return io.TextIOWrapper(zf.open(members[0]), encoding="utf-8")
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller


def infer_symbol_interval(path: str | Path) -> tuple[str, str]:
    """``BTCUSDT-1m-2024-01.zip`` (Binance's naming) -> (``BTCUSDT``, ``1m``)."""
    parts = Path(path).name.split("-")
    if len(parts) < 2 or parts[1] not in INTERVAL_MS:
        raise InvalidKline(
            f"{path}: cannot tell symbol and interval from the file name; "
            "name it SYMBOL-INTERVAL-... as Binance does, or pass them explicitly"
        )
    return parts[0].upper(), parts[1]


def iter_kline_csv(
    path: str | Path, symbol: str | None = None, interval: str | None = None
) -> Iterable[Kline]:
    """Yield validated klines from a Binance kline CSV (.csv, .csv.gz or .zip)."""
    path = Path(path)
    if symbol is None or interval is None:
        s, i = infer_symbol_interval(path)
        symbol, interval = symbol or s, interval or i
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(",")
            if lineno == 1 and not fields[0].strip().lstrip("-").isdigit():
                continue  # header row: Binance added one to its archives in 2022
            try:
                yield kline_from_row(fields, symbol, interval)
            except InvalidKline as exc:
                raise InvalidKline(f"{path}:{lineno}: {exc.reason}") from None


def read_kline_csv(
    path: str | Path, symbol: str | None = None, interval: str | None = None
) -> list[Kline]:
    return list(iter_kline_csv(path, symbol, interval))


def klines_to_frame(klines: Iterable[Kline]):  # -> pandas.DataFrame
    import pandas as pd

    rows = [k.to_dict() for k in klines]
    frame = pd.DataFrame(rows, columns=list(Kline.__dataclass_fields__))
    return frame.astype({"open_time": "int64", "close_time": "int64", "trades": "int64"})


def read_kline_frame(path: str | Path, symbol: str | None = None, interval: str | None = None):
    """A Binance kline file (CSV/CSV.GZ/ZIP, or a Parquet written by the archive) as a DataFrame
    with the ``Kline`` field names as columns, sorted by open_time."""
    import pandas as pd

    path = Path(path)
    if path.suffix.lower() == ".parquet" or path.is_dir():
        frame = pd.read_parquet(path)
        missing = {"open_time", "open", "high", "low", "close", "volume"} - set(frame.columns)
        if missing:
            raise InvalidKline(f"{path}: parquet lacks kline columns {sorted(missing)}")
        return frame.sort_values("open_time", kind="stable").reset_index(drop=True)
    return klines_to_frame(iter_kline_csv(path, symbol, interval))


# --- websocket -------------------------------------------------------------------------


def parse_ws_kline(message: bytes | str | dict[str, Any]) -> Kline:
    """A Binance websocket kline event -> ``Kline`` (validated).

    Accepts the raw stream payload (``{"e":"kline",...}``) and the combined-stream
    wrapper (``{"stream":"btcusdt@kline_1m","data":{...}}``).
    """
    if isinstance(message, (bytes, str)):
        try:
            message = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            raise InvalidKline(f"malformed JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidKline(f"expected a JSON object, got {type(message).__name__}")
    stream = message.get("stream")
    data = message.get("data", message) if stream is not None else message
    if not isinstance(data, dict) or data.get("e") != "kline":
        raise InvalidKline(f"not a kline event: e={data.get('e') if isinstance(data, dict) else None!r}")
    k = data.get("k")
    if not isinstance(k, dict):
        raise InvalidKline("kline event without a 'k' object")
    try:
        kline = Kline(
            symbol=str(k["s"]),
            interval=str(k["i"]),
            open_time=_ms(k["t"]),
            close_time=_ms(k["T"]),
            open=float(k["o"]),
            high=float(k["h"]),
            low=float(k["l"]),
            close=float(k["c"]),
            volume=float(k["v"]),
            quote_volume=_float(k.get("q")),
            trades=_int(k.get("n")),
            taker_buy_base=_float(k.get("V")),
            taker_buy_quote=_float(k.get("Q")),
            closed=bool(k["x"]),
        )
    except KeyError as exc:
        raise InvalidKline(f"kline event lacks field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(float("1e999"))
        raise InvalidKline(f"kline event has an unreadable field: {exc}") from None
    if stream is not None and stream != ws_stream_name(kline.symbol, kline.interval):
        raise InvalidKline(f"stream {stream!r} carries a {kline.symbol} {kline.interval} kline")
    return validate_kline(kline)


def ws_stream_name(symbol: str, interval: str) -> str:
    """Binance's stream name: lower-case symbol, ``<symbol>@kline_<interval>``."""
    return f"{symbol.lower()}@kline_{interval}"


def kline_to_ws_payload(k: Kline, event_time: int | None = None) -> dict[str, Any]:
    """The websocket ``kline`` event Binance would send for ``k`` (used by the simulator)."""
    return {
        "e": "kline",
        "E": event_time if event_time is not None else k.close_time + 1,
        "s": k.symbol,
        "k": {
            "t": k.open_time,
            "T": k.close_time,
            "s": k.symbol,
            "i": k.interval,
            "f": 0,
            "L": max(k.trades - 1, 0),
            "o": _fmt(k.open),
            "c": _fmt(k.close),
            "h": _fmt(k.high),
            "l": _fmt(k.low),
            "v": _fmt(k.volume),
            "n": k.trades,
            "x": k.closed,
            "q": _fmt(k.quote_volume),
            "V": _fmt(k.taker_buy_base),
            "Q": _fmt(k.taker_buy_quote),
            "B": "0",
        },
    }


def kline_to_rest_row(k: Kline) -> list[Any]:
    """The ``GET /api/v3/klines`` array for ``k``: numbers as strings, as Binance sends them."""
    return [
        k.open_time,
        _fmt(k.open),
        _fmt(k.high),
        _fmt(k.low),
        _fmt(k.close),
        _fmt(k.volume),
        k.close_time,
        _fmt(k.quote_volume),
        k.trades,
        _fmt(k.taker_buy_base),
        _fmt(k.taker_buy_quote),
        "0",
    ]


def _fmt(x: float) -> str:
    # repr round-trips a float exactly; Binance pads to 8 decimals but readers must not care.
    return repr(float(x))
