"""Yahoo history over a real loopback HTTP server answering Yahoo-shaped chart documents
(tests/fixtures/yahoo/README.md says where their values come from)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from klinebus.cli import main
from libs.common.archive import ParquetArchive
from libs.common.klines import read_kline_csv
from services.ingest.yahoo import YahooError, chart_to_klines, import_yahoo, ticker_for, yahoo_archive_root

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "yahoo"
CHART = json.loads((FIXTURES / "chart_eth-usd_60m_2021-04-04.json").read_text())
NOT_FOUND = (FIXTURES / "chart_not_found.json").read_bytes()
ETH_1H = Path(__file__).resolve().parents[2] / "data" / "klines" / "ETHUSDT-1h-2021-04-04-head3000.csv.gz"
HOUR = 3_600_000


@pytest.fixture
def yahoo_server():
    asked: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            url = urllib.parse.urlparse(self.path)
            asked.append({"path": url.path, **dict(urllib.parse.parse_qsl(url.query))})
            if url.path == "/v8/finance/chart/ETH-USD":
                body, status = json.dumps(CHART).encode(), 200
            else:
                body, status = NOT_FOUND, 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def test_tickers():
    assert ticker_for("BTCUSDT") == "BTC-USD" and ticker_for("ethusdc") == "ETH-USD"
    with pytest.raises(YahooError, match="cannot map"):
        ticker_for("ETHBTC")


def test_chart_document_to_closed_klines():
    stamps = CHART["chart"]["result"][0]["timestamp"]
    now = stamps[-1] * 1000 + HOUR // 2  # the last bar is still open
    r = chart_to_klines(CHART, "ETHUSDT", "1h", now_ms=now)
    assert (r.skipped_null, r.skipped_open, r.skipped_invalid) == (1, 1, 0)
    assert len(r.klines) == 46
    binance = {k.open_time: k for k in read_kline_csv(ETH_1H)[:48]}
    for k in r.klines:  # prices are Binance's (see the fixture's README); open times line up
        b = binance[k.open_time]
        assert (k.open, k.high, k.low, k.close) == (b.open, b.high, b.low, b.close)
        assert k.close_time == k.open_time + HOUR - 1 and k.symbol == "ETHUSDT"
    with pytest.raises(YahooError, match="Not Found: No data found"):
        chart_to_klines(json.loads(NOT_FOUND), "XUSDT", "1h")


def test_import_into_its_own_tagged_archive(yahoo_server, tmp_path):
    url, asked = yahoo_server
    stamps = CHART["chart"]["result"][0]["timestamp"]
    start, end = stamps[0] * 1000, stamps[-1] * 1000
    root = yahoo_archive_root(str(tmp_path / "archive"))
    got = import_yahoo(root, ["ETHUSDT"], ["1h"], start, end, base_url=url, now_ms=end + 10 * HOUR)
    assert len(got[("ETHUSDT", "1h")].klines) == 47  # 48 bars, one null
    assert asked == [{"path": "/v8/finance/chart/ETH-USD", "period1": str(start // 1000), "period2": str(end // 1000),
                      "interval": "60m", "includePrePost": "false", "events": "div,splits"}]
    frame = ParquetArchive(root).read("ETHUSDT", "1h")
    assert len(frame) == 47 and frame["open_time"].is_monotonic_increasing
    assert json.loads((Path(root) / "source.json").read_text())["source"] == "yahoo"
    assert root.endswith("archive-yahoo") and not (tmp_path / "archive").exists()
    # importing again changes nothing (the archive merges on open_time)
    import_yahoo(root, ["ETHUSDT"], ["1h"], start, end, base_url=url, now_ms=end + 10 * HOUR)
    assert len(ParquetArchive(root).read("ETHUSDT", "1h")) == 47


def test_refuses_a_binance_archive_and_unknown_things(yahoo_server, tmp_path):
    url, _ = yahoo_server
    binance = tmp_path / "archive"
    ParquetArchive(str(binance)).write(read_kline_csv(ETH_1H)[:10])
    stamps = CHART["chart"]["result"][0]["timestamp"]
    now = stamps[-1] * 1000 + 10 * HOUR
    with pytest.raises(YahooError, match="without a source.json tag"):
        import_yahoo(str(binance), ["ETHUSDT"], ["1h"], stamps[0] * 1000, stamps[-1] * 1000, base_url=url, now_ms=now)
    with pytest.raises(YahooError, match="Not Found"):
        import_yahoo(str(tmp_path / "y"), ["DOGEUSDT"], ["1h"], stamps[0] * 1000, stamps[-1] * 1000, base_url=url, now_ms=now)
    with pytest.raises(YahooError, match="no 4h bars"):
        import_yahoo(str(tmp_path / "y"), ["ETHUSDT"], ["4h"], stamps[0] * 1000, stamps[-1] * 1000, base_url=url, now_ms=now)
    with pytest.raises(YahooError, match="last 730 days"):
        import_yahoo(str(tmp_path / "y"), ["ETHUSDT"], ["1h"], stamps[0] * 1000, stamps[-1] * 1000, base_url=url,
                     now_ms=now + 800 * 86_400_000)


def test_cli_source_yahoo(yahoo_server, tmp_path, capsys, monkeypatch):
    url, asked = yahoo_server
    monkeypatch.setenv("KLINEBUS_DATA_DIR", str(tmp_path))
    # the fixture's bars are from 2021: Yahoo keeps hourly bars for 730 days, so today's CLI refuses them
    assert main(["history", "import", "--source", "yahoo", "--yahoo-url", url, "--symbols", "ETHUSDT",
                 "--intervals", "1h", "--start", "2021-04-04", "--end", "2021-04-06"]) == 2
    assert "last 730 days" in capsys.readouterr().err
    assert main(["history", "import", "--source", "yahoo", "--yahoo-url", url, "--symbols", "DOGEUSDT",
                 "--intervals", "1d", "--start", "2021-04-04", "--end", "2021-04-06"]) == 2
    err = capsys.readouterr().err
    assert "Not Found" in err and len(err.strip().splitlines()) == 1
    assert asked[-1]["path"] == "/v8/finance/chart/DOGE-USD" and asked[-1]["interval"] == "1d"
    # an answer at another granularity than asked is refused, not stored under the wrong interval
    assert main(["history", "import", "--source", "yahoo", "--yahoo-url", url, "--symbols", "ETHUSDT",
                 "--intervals", "1d", "--start", "2021-04-04", "--end", "2021-04-06"]) == 2
    assert "answered 1h bars for a 1d request" in capsys.readouterr().err
    # inside Yahoo's window the import runs; the server's 2021 bars fall outside the asked days: none kept
    day = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=10)
    assert main(["history", "import", "--source", "yahoo", "--yahoo-url", url, "--symbols", "ETHUSDT",
                 "--intervals", "1h", "--start", day.isoformat(), "--end", day.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "ETHUSDT 1h (yahoo ETH-USD): 0 candles" in out and str(tmp_path / "archive-yahoo") in out
    midnight = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
    assert asked[-1]["period1"] == str(int(midnight.timestamp()))
