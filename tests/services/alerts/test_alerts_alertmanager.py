"""The Alertmanager sink against a real Alertmanager (Debian's prometheus-alertmanager), queried
through its own API, routing to a webhook receiver on loopback."""

from __future__ import annotations

import asyncio

from alert_receivers import Receiver, ok
from alert_support import alert, close, harness

from libs.common.klines import now_ms
from services.alerts.sinks.alertmanager import AlertmanagerSink
from tests.monitoring.processes import alertmanager, get_json, until


async def test_an_alert_reaches_alertmanager_is_routed_and_resolves(redis_url, tmp_path):
    async with Receiver([ok()], "/am-hook") as hook:
        with alertmanager(tmp_path / "am", hook.url) as am_url:
            h = await harness(redis_url, [AlertmanagerSink("alertmanager", am_url)])
            try:
                t = now_ms()
                await h.dispatcher.handle(alert(fired_at=t))

                def active():
                    return [a for a in get_json(f"{am_url}/api/v2/alerts?active=true") if a["labels"].get("alertname") == "rsi_extreme"]

                (got,) = await until(active, "the alert active in Alertmanager")
                assert got["labels"] == {"alertname": "rsi_extreme", "severity": "warning", "source": "klinebus",
                                         "symbol": "BTCUSDT", "interval": "1m", "feature": "rsi_14"}
                assert got["annotations"]["summary"] == "BTCUSDT 1m: rsi_14 81.2 overbought"
                assert got["status"]["state"] == "active"
                await hook.wait_for(1)
                firing = hook.requests[0].json
                assert firing["status"] == "firing" and firing["alerts"][0]["labels"]["symbol"] == "BTCUSDT"

                await h.dispatcher.handle(alert(fired_at=now_ms(), status="resolved", message="resolved: rsi 70"))

                def resolved_notice():
                    return [r for r in hook.requests if r.json["status"] == "resolved"]

                (notice,) = await until(resolved_notice, "Alertmanager's resolved notification")
                assert notice.json["alerts"][0]["labels"]["alertname"] == "rsi_extreme"
                assert await asyncio.to_thread(active) == []
            finally:
                await close(h)
