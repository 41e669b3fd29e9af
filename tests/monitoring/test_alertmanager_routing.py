"""On-call wiring: every system rule links its runbook section in docs/alerts.md, and the shipped
Alertmanager routing pages for critical system alerts only: market alerts (the alerts service's,
source="klinebus") reach their own receiver whatever their severity, and that receiver never pages.
Routing is checked by Alertmanager's own `amtool config routes test` on the shipped file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import generate, rules
from tests.monitoring.processes import binary

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monitoring" / "alertmanager" / "alertmanager.yml"
PAGING = {"system-pager"}


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' dropped, spaces to '-'."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_rule_has_a_runbook_url_to_its_section_in_docs_alerts_md():
    anchors = _anchors(generate.ALERTS_DOC.read_text())
    shipped = [r for f in (generate.RULES_FILE, generate.PROMETHEUS_RULE)
               for g in (yaml.safe_load(f.read_text()).get("spec") or yaml.safe_load(f.read_text()))["groups"]
               for r in g["rules"]]
    assert len(shipped) == 2 * len(rules.RULES)
    for r in shipped:
        url = r["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == rules.RUNBOOK_BASE and base.endswith("/docs/alerts.md"), r["alert"]
        assert anchor in anchors, f"{r['alert']}: {url} names no heading of docs/alerts.md"
        assert r["labels"]["kind"] == "system"


def test_every_runbook_section_says_what_it_means_what_to_check_and_how_to_fix_it():
    text = generate.ALERTS_DOC.read_text()
    assert set(rules.FIXES) == {r.name for r in rules.RULES}
    for r in rules.RULES:
        section = text.split(f"### {r.name}\n", 1)[1].split("\n### ", 1)[0]
        for part in ("**Meaning.**", "**First checks.**", "**Fix.**"):
            assert part in section, (r.name, part)


def test_redis_memory_aof_and_replication_are_alerted():
    redis = {r.name: r.expr for r in rules.RULES if r.group == "klinebus-redis"}
    assert any("redis_memory_used_bytes" in e for e in redis.values())
    assert any("redis_aof_last_write_status" in e for e in redis.values())
    assert any("redis_master_link_up" in e for e in redis.values())
    assert any("redis_evicted_keys_total" in e for e in redis.values())


def _route(*labels: str) -> str:
    amtool = binary("amtool")
    out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={CONFIG}", *labels],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip()


def test_the_shipped_alertmanager_config_is_valid():
    out = subprocess.run([binary("amtool"), "check-config", str(CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("severity", ["info", "warning", "critical"])
def test_market_alerts_go_to_their_own_receiver_and_never_page(severity):
    # the labels the alerts service sends (services/alerts/notification.labels_of), even a
    # market rule configured with severity critical, or one whose labels claim kind=system
    for extra in ((), ("kind=system",)):
        got = _route("alertname=predicted_move", f"severity={severity}", "source=klinebus",
                     "symbol=BTCUSDT", "interval=15m", "model=lstm", *extra)
        assert got == "market", (severity, extra)
        assert got not in PAGING


def test_system_alerts_page_by_severity():
    for r in rules.RULES:
        labels = [f"{k}={v}" for k, v in {"alertname": r.name, **r.labels()}.items()]
        got = _route(*labels)
        assert got == ("system-pager" if r.severity == "critical" else "system-ticket"), r.name


def test_nothing_unlabelled_pages():
    assert _route("alertname=Watchdog", "severity=critical") == "system-ticket"


def test_no_receiver_but_system_pager_is_a_paging_one():
    config = yaml.safe_load(CONFIG.read_text())
    for receiver in config["receivers"]:
        if receiver["name"] not in PAGING:
            assert not any(k in receiver for k in ("pagerduty_configs", "opsgenie_configs", "victorops_configs")), receiver
