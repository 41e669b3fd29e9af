"""The generated monitoring files are the generator's output, Prometheus' own tools accept the
rules, and each rule's unit cases (series that must and must not make it fire) pass in promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from monitoring import dashboards, generate, rules
from tests.monitoring.processes import binary

ROOT = Path(__file__).resolve().parents[2]


def test_generated_files_are_current():
    assert generate.stale() == [], "run: .venv/bin/python -m monitoring.generate"


def test_promtool_accepts_the_rules_file():
    promtool = binary("promtool")
    out = subprocess.run([promtool, "check", "rules", str(generate.RULES_FILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules.RULES)} rules found" in out.stdout


def test_every_rule_fires_and_stays_quiet_in_promtools_unit_tests():
    promtool = binary("promtool")
    for r in rules.RULES:
        assert any(c.fires for c in r.cases) and any(not c.fires for c in r.cases), f"{r.name} needs both cases"
    out = subprocess.run([promtool, "test", "rules", generate.RULES_TEST_FILE.name], capture_output=True, text=True,
                         cwd=generate.RULES_TEST_FILE.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_prometheusrule_holds_the_same_rules_as_the_rules_file():
    resource = yaml.safe_load(generate.PROMETHEUS_RULE.read_text())
    plain = yaml.safe_load(generate.RULES_FILE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == plain["groups"]


def test_the_monitoring_component_ships_every_dashboard_and_the_rule():
    kustomization = yaml.safe_load((ROOT / "k8s" / "components" / "monitoring" / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    files = [f for gen in kustomization["configMapGenerator"] for f in gen.get("files", [])]
    assert sorted(files) == sorted(f"dashboards/{uid}.json" for uid in dashboards.BOARDS)
    assert "prometheusrule.yaml" in kustomization["resources"]


def test_compose_provisions_prometheus_alertmanager_and_grafana_from_the_generated_files():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    svc = compose["services"]
    for name in ("prometheus", "alertmanager", "grafana"):
        assert svc[name]["profiles"] == ["monitoring"]
    mounts = " ".join(v for name in ("prometheus", "grafana") for v in svc[name]["volumes"])
    assert "./monitoring/prometheus/rules.yml" in mounts and "./k8s/components/monitoring/dashboards" in mounts
    prom_config = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in prom_config["scrape_configs"]}
    run = {s["command"][1] for s in svc.values() if s.get("command", [""])[0] == "run"}
    assert run <= jobs


def test_prometheus_and_alertmanager_accept_the_compose_configs(tmp_path):
    promtool = binary("promtool")
    amtool = binary("amtool")
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(generate.RULES_FILE)]  # the container's mount point, here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([amtool, "check-config", str(ROOT / "monitoring" / "alertmanager" / "alertmanager.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alerts_service_accepts_the_monitoring_components_values(monkeypatch):
    import os

    from libs.common.settings import load_settings
    from services.alerts.settings import AlertsSettings

    env: dict[str, str] = {}
    for folder in ("base", "overlays/production", "components/monitoring"):
        for gen in yaml.safe_load((ROOT / "k8s" / folder / "kustomization.yaml").read_text()).get("configMapGenerator", []):
            env.update(lit.split("=", 1) for lit in gen.get("literals", []))
    for key in [k for k in os.environ if k.startswith("KLINEBUS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(AlertsSettings)
    assert settings.alertmanager_urls == ["http://alertmanager-operated.monitoring.svc:9093"]
