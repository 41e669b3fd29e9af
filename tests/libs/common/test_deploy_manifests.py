"""The deployment files agree with the code: every service they run exists, probes hit real
endpoints, and every KLINEBUS_ variable they set is a real setting."""

from pathlib import Path

import yaml

from libs.common.cli import SERVICES, app_module

ROOT = Path(__file__).resolve().parents[3]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _setting_names() -> set[str]:
    names = set()
    for service in ("ingest", "features", "charts", "inference", "archive"):
        names |= {f"KLINEBUS_{f.upper()}" for f in app_module(service).SETTINGS.model_fields}
    return names


def test_kubernetes_deployments_run_real_services_with_real_probes():
    deployments = [d for p in (ROOT / "k8s" / "base").glob("*.yaml") for d in _docs(p) if d.get("kind") == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"ingest", "archive", "features", "charts", "inference"}
    for d in deployments:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == "run" and container["args"][1] in SERVICES
        app_module(container["args"][1])  # the service is built
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_configured_variables_are_settings_the_services_read():
    known = _setting_names()
    literals = []
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        for gen in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", []):
            literals += [lit.split("=", 1)[0] for lit in gen.get("literals", [])]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    literals += list(compose["x-klinebus"]["environment"])
    unknown = sorted(set(literals) - known)
    assert not unknown, f"set in k8s/compose but read by no service: {unknown}"


def test_compose_runs_every_built_service():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    run = {s["command"][1] for s in compose["services"].values() if s.get("command", [""])[0] == "run"}
    assert run == {"ingest", "archive", "features", "charts", "inference"}
