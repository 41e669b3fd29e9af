"""A second source of training history: Yahoo Finance's v8 chart API (seed 002's fallback when
Binance is unreachable). ``klinebus history import --source yahoo`` stores what it fetches in its
own archive (``<archive>-yahoo`` by default, tagged ``source.json``), never in the Binance archive,
so Yahoo candles cannot slip silently into Binance streams or datasets.

Two ways in, one parser (``chart_to_klines``):

* default: ``yfinance`` (it performs Yahoo's cookie and crumb handshake), asking for the raw chart
  document through ``yfinance``'s own session;
* ``--yahoo-url URL``: a plain HTTP GET of ``URL/v8/finance/chart/<ticker>`` (a mirror, or the
  recorded-response server the tests run).

What differs from Binance, said here once: Yahoo's crypto ``volume`` is in the quote currency
(USD), not in the base asset; there is no trade count or taker volume; the last bar of a range may
still be open and is dropped; bars with null prices (Yahoo emits them) are skipped and counted.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from libs.common.archive import ParquetArchive
from libs.common.klines import InvalidKline, Kline, interval_ms, validate_kline

log = logging.getLogger("klinebus.ingest.yahoo")

YAHOO_CHART_URL = "https://query2.finance.yahoo.com"
SOURCE_TAG = "yahoo"
SOURCE_FILE = "source.json"
# Binance interval -> Yahoo chart interval (Yahoo has no 3m, 2h, 4h, 6h, 8h, 12h, 3d).
INTERVALS = {"1m": "1m", "5m": "5m", "15m": "15m", "30m": "30m", "1h": "60m", "1d": "1d", "1w": "1wk", "1M": "1mo"}
# How far back Yahoo serves each granularity (the chart API answers 422 beyond it; the limits are
# those yfinance enforces in its history code): 1m bars for 30 days, other intraday bars for 60
# days, hourly for 730 days; daily and longer without limit.
MAX_HISTORY_DAYS = {"1m": 30, "5m": 60, "15m": 60, "30m": 60, "1h": 730}
# Yahoo answers at most 8 days of 1m bars per request (yfinance splits longer asks the same way).
MAX_DAYS_PER_REQUEST = {"1m": 8}
HTTP_TIMEOUT_S = 30.0


class YahooError(RuntimeError):
    """Yahoo refused or answered something unusable (one line)."""


def ticker_for(symbol: str) -> str:
    """``BTCUSDT`` -> ``BTC-USD``: Yahoo quotes crypto against USD, the nearest to a USDT pair."""
    symbol = symbol.upper()
    for quote in ("USDT", "USDC", "BUSD", "USD"):
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return f"{symbol[: -len(quote)]}-USD"
    raise YahooError(f"{symbol}: cannot map to a Yahoo ticker (expected a ...USDT/USDC/BUSD/USD pair)")


@dataclass
class ChartResult:
    klines: list[Kline]
    skipped_null: int
    skipped_open: int
    skipped_invalid: int


def chart_to_klines(doc: dict[str, Any], symbol: str, interval: str, now_ms: int | None = None) -> ChartResult:
    """A v8 chart document -> closed, validated klines under the Binance-style ``symbol``."""
    chart = doc.get("chart") if isinstance(doc, dict) else None
    if not isinstance(chart, dict):
        raise YahooError("not a Yahoo chart document (no 'chart' object)")
    if chart.get("error"):
        err = chart["error"]
        raise YahooError(f"Yahoo: {err.get('code', '?')}: {err.get('description', '')}".strip())
    results = chart.get("result") or []
    if not results:
        raise YahooError("Yahoo answered no result")
    res = results[0]
    granularity = (res.get("meta") or {}).get("dataGranularity")
    if granularity is not None and granularity not in (INTERVALS[interval], interval):
        raise YahooError(f"Yahoo answered {granularity} bars for a {interval} request")
    stamps = res.get("timestamp") or []
    quotes = ((res.get("indicators") or {}).get("quote") or [{}])[0]
    step = interval_ms(interval)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    out: list[Kline] = []
    nulls = still_open = invalid = 0
    for i, ts in enumerate(stamps):
        try:
            o, h, low, c = (quotes[f][i] for f in ("open", "high", "low", "close"))
            v = (quotes.get("volume") or [None] * len(stamps))[i]
        except (KeyError, IndexError):
            raise YahooError(f"chart quote arrays are shorter than its {len(stamps)} timestamps") from None
        if None in (o, h, low, c):
            nulls += 1
            continue
        open_time = int(ts) * 1000
        if open_time + step > now_ms:
            still_open += 1
            continue
        try:
            out.append(validate_kline(Kline(
                symbol=symbol, interval=interval, open_time=open_time, close_time=open_time + step - 1,
                open=float(o), high=float(h), low=float(low), close=float(c), volume=float(v or 0.0),
            )))
        except InvalidKline as e:
            invalid += 1
            log.warning("yahoo %s %s: skipped an impossible bar: %s", symbol, interval, e)
    return ChartResult(out, nulls, still_open, invalid)


def _windows(interval: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    days = MAX_DAYS_PER_REQUEST.get(interval)
    if days is None:
        return [(start_ms, end_ms)]
    width = days * 86_400_000
    return [(s, min(s + width, end_ms)) for s in range(start_ms, end_ms, width)]


def fetch_chart_http(base_url: str, ticker: str, yahoo_interval: str, start_ms: int, end_ms: int) -> dict:
    query = urllib.parse.urlencode({
        "period1": start_ms // 1000, "period2": end_ms // 1000, "interval": yahoo_interval,
        "includePrePost": "false", "events": "div,splits",
    })
    url = f"{base_url.rstrip('/')}/v8/finance/chart/{urllib.parse.quote(ticker)}?{query}"
    req = urllib.request.Request(url, headers={"User-Agent": "klinebus", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())  # Yahoo explains refusals in a chart document
        except Exception:
            raise YahooError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
        raise YahooError(f"{url}: {e}") from None


def fetch_chart_yfinance(ticker: str, yahoo_interval: str, start_ms: int, end_ms: int) -> dict:
    """The same chart document through yfinance's session (cookie and crumb handled there)."""
    try:
        from yfinance.data import YfData
    except ImportError:
        raise YahooError("yfinance is not installed (the trainer extra has it)") from None
    params = {"period1": start_ms // 1000, "period2": end_ms // 1000, "interval": yahoo_interval,
              "includePrePost": False, "events": "div,splits"}
    try:
        resp = YfData().get(url=f"{YAHOO_CHART_URL}/v8/finance/chart/{ticker}", params=params, timeout=HTTP_TIMEOUT_S)
        return resp.json()
    except Exception as e:  # network, TLS, rate limit: one line
        raise YahooError(f"yfinance: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def yahoo_archive_root(binance_root: str) -> str:
    return binance_root.rstrip("/") + f"-{SOURCE_TAG}"


def tag_archive(root: str) -> None:
    archive = ParquetArchive(root)
    archive.fs.makedirs(archive.root, exist_ok=True)
    marker = f"{archive.root}/{SOURCE_FILE}"
    if not archive.fs.exists(marker):
        with archive.fs.open(marker, "w") as f:
            f.write(json.dumps({"source": SOURCE_TAG, "api": "v8/finance/chart",
                                "volume": "quote currency (USD), not the base asset"}) + "\n")


def refuse_binance_archive(root: str) -> None:
    """An archive without the Yahoo tag that already holds candles is someone else's: refuse it."""
    archive = ParquetArchive(root)
    marker = f"{archive.root}/{SOURCE_FILE}"
    if archive.fs.exists(archive.root) and not archive.fs.exists(marker) and archive.fs.ls(archive.root, detail=False):
        raise YahooError(f"{root} holds candles without a {SOURCE_FILE} tag (a Binance archive?); "
                         "Yahoo history goes to its own archive")


def import_yahoo(
    archive_root: str, symbols: list[str], intervals: list[str], start_ms: int, end_ms: int,
    base_url: str | None = None, now_ms: int | None = None,
) -> dict[tuple[str, str], ChartResult]:
    """Fetch, parse and merge into the Yahoo archive; returns what each stream gave."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for interval in intervals:
        if interval not in INTERVALS:
            raise YahooError(f"Yahoo has no {interval} bars; it serves {', '.join(INTERVALS)}")
        limit = MAX_HISTORY_DAYS.get(interval)
        if limit is not None and start_ms < now_ms - limit * 86_400_000:
            raise YahooError(f"Yahoo serves {interval} bars for the last {limit} days only; move --start later")
    refuse_binance_archive(archive_root)
    tag_archive(archive_root)
    archive = ParquetArchive(archive_root)
    out: dict[tuple[str, str], ChartResult] = {}
    for symbol in symbols:
        ticker = ticker_for(symbol)
        for interval in intervals:
            total = ChartResult([], 0, 0, 0)
            for s, e in _windows(interval, start_ms, end_ms):
                doc = (fetch_chart_http(base_url, ticker, INTERVALS[interval], s, e) if base_url
                       else fetch_chart_yfinance(ticker, INTERVALS[interval], s, e))
                part = chart_to_klines(doc, symbol, interval, now_ms)
                total.klines += [k for k in part.klines if start_ms <= k.open_time <= end_ms]
                total.skipped_null += part.skipped_null
                total.skipped_open += part.skipped_open
                total.skipped_invalid += part.skipped_invalid
            archive.write(total.klines)
            out[(symbol, interval)] = total
    return out


def run_cli(args: Any) -> None:
    """``klinebus history import --source yahoo`` (wired in services/ingest/cli.py)."""
    import datetime as dt

    from libs.common.errors import CliError
    from libs.common.settings import load_settings, parse_csv_list
    from services.ingest.settings import IngestSettings

    settings = load_settings(IngestSettings, symbols=parse_csv_list(args.symbols), intervals=parse_csv_list(args.intervals))
    if args.end < args.start:
        raise CliError(f"--end {args.end} is before --start {args.start}")
    day = dt.timezone.utc
    start_ms = int(dt.datetime.combine(args.start, dt.time(), day).timestamp() * 1000)
    end_ms = int(dt.datetime.combine(args.end, dt.time(23, 59, 59), day).timestamp() * 1000)
    root = args.archive or yahoo_archive_root(settings.archive_root())
    try:
        got = import_yahoo(root, settings.symbols, settings.intervals, start_ms, end_ms, base_url=args.yahoo_url)
    except YahooError as e:
        raise CliError(str(e)) from None
    for (symbol, interval), r in got.items():
        notes = [f"{n} {what}" for n, what in ((r.skipped_null, "null bars"), (r.skipped_open, "still open"),
                                                (r.skipped_invalid, "impossible")) if n]
        print(f"{symbol} {interval} (yahoo {ticker_for(symbol)}): {len(r.klines)} candles"
              + (f"; skipped {', '.join(notes)}" if notes else ""))
    print(f"yahoo archive: {root}")
