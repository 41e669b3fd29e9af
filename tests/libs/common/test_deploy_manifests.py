"""The deployment files agree with the code: every service they run exists, probes hit real
endpoints, and every KLINEBUS_ variable they set is a real setting."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from klinebus.cli import SERVICES, app_module

ROOT = Path(__file__).resolve().parents[3]
# Services the manifests deploy (k8s/base and compose.yaml).
DEPLOYED = {"ingest", "archive", "features", "charts", "inference", "alerts", "trainer", "vlm"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _setting_names() -> set[str]:
    names = set()
    for service in sorted(DEPLOYED):
        names |= {f"KLINEBUS_{f.upper()}" for f in app_module(service).SETTINGS.model_fields}
    return names


def test_kubernetes_deployments_run_real_services_with_real_probes():
    deployments = [d for p in (ROOT / "k8s" / "base").glob("*.yaml") for d in _docs(p) if d.get("kind") == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == DEPLOYED
    for d in deployments:
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == "run" and container["args"][1] in SERVICES
        app_module(container["args"][1])  # the service is built
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # variables set on the container are settings of the service it runs
        fields = {f"KLINEBUS_{f.upper()}" for f in app_module(container["args"][1]).SETTINGS.model_fields}
        unknown = {e["name"] for e in container.get("env", [])} - fields
        assert not unknown, f"{d['metadata']['name']} sets {sorted(unknown)}, which it does not read"
        # secrets are optional: a pod without its Secret still starts
        assert all(s["secretRef"].get("optional") for s in container["envFrom"] if "secretRef" in s)


def test_configured_variables_are_settings_the_services_read():
    known = _setting_names()
    literals = []
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        for gen in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", []):
            literals += [lit.split("=", 1)[0] for lit in gen.get("literals", [])]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    literals += list(compose["x-klinebus"]["environment"])
    literals += [k for s in compose["services"].values() if isinstance(s.get("environment"), dict) for k in s["environment"]]
    unknown = sorted(set(literals) - known)
    assert not unknown, f"set in k8s/compose but read by no service: {unknown}"


def test_compose_runs_every_built_service():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    run = {s["command"][1] for s in compose["services"].values() if s.get("command", [""])[0] == "run"}
    assert run == DEPLOYED


def _exported_metric_names() -> set[str]:
    """Every sample name the built services expose on /metrics (counters with _total, histograms
    with _bucket/_sum/_count), read from the real registry after building each service."""
    from prometheus_client import REGISTRY, generate_latest

    from klinebus.pipeline import build_runtime

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for service in ("ingest", "archive", "features", "charts", "inference", "alerts"):
            build_runtime(service, "redis://localhost:1/0", Path(tmp))
    names = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE klinebus_"):
            name, kind = line.split()[2:4]
            names |= {name} if kind != "histogram" else {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names.add(f"{name}_total" if not name.endswith("_total") else name)
    return names


def test_alerts_and_dashboard_query_metrics_that_exist():
    import json
    import re

    monitoring = ROOT / "k8s" / "components" / "monitoring"
    exprs = [r["expr"] for g in _docs(monitoring / "prometheusrule.yaml")[0]["spec"]["groups"] for r in g["rules"]]
    for path in sorted((monitoring / "dashboards").glob("*.json")):
        exprs += [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p["targets"]]
    exported = _exported_metric_names()
    # the VLM service is not built here (it needs a GGUF model); tests/monitoring's live test lists it too
    named = {m for e in exprs for m in re.findall(r"\b(klinebus_[a-z0-9_]+)\b", e) if not m.startswith("klinebus_vlm_")}
    assert named, "no metric found in the queries"
    assert named <= exported, f"queried but never exported: {sorted(named - exported)}"
    # regex selectors must match something too
    for pattern in {p for e in exprs for p in re.findall(r'__name__=~"([^"]+)"', e)}:
        assert any(re.fullmatch(pattern, n) for n in exported), pattern


def test_dashboards_and_rules_are_the_generators_output():
    from monitoring import generate

    assert generate.stale() == [], "run: .venv/bin/python -m monitoring.generate"


def test_every_service_accepts_the_values_the_manifests_set(monkeypatch):
    """Not only the names: each service's settings load from each overlay's values."""
    from libs.common.settings import load_settings

    for overlay in ("base", "overlays/dev", "overlays/production"):
        env: dict[str, str] = {}
        chain = [ROOT / "k8s" / "base"] if overlay == "base" else [ROOT / "k8s" / "base", ROOT / "k8s" / overlay]
        for folder in chain:
            for gen in yaml.safe_load((folder / "kustomization.yaml").read_text()).get("configMapGenerator", []):
                env.update(lit.split("=", 1) for lit in gen.get("literals", []))
        for key in [k for k in list(__import__("os").environ) if k.startswith("KLINEBUS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for service in sorted(DEPLOYED):
            load_settings(app_module(service).SETTINGS)  # raises one line on a bad value


def _gpu_patches() -> dict[str, dict]:
    kustomization = yaml.safe_load((ROOT / "k8s" / "components" / "gpu" / "kustomization.yaml").read_text())
    return {p["target"]["name"]: yaml.safe_load(p["patch"]) for p in kustomization["patches"]}


def test_gpu_component_gives_trainer_and_vlm_one_gpu_each():
    patches = _gpu_patches()
    assert set(patches) == {"trainer", "vlm"}
    for name, patch in patches.items():
        spec = patch["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["name"] == name  # strategic merge matches the base container by name
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        fields = {f"KLINEBUS_{f.upper()}" for f in app_module(name).SETTINGS.model_fields}
        assert {e["name"] for e in container.get("env", [])} <= fields
    assert {"name": "KLINEBUS_DEVICE", "value": "cuda"} in patches["trainer"]["spec"]["template"]["spec"]["containers"][0]["env"]


def _overlays() -> list[Path]:
    return [ROOT / "k8s" / "base"] + sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("folder", _overlays(), ids=lambda p: p.name)
def test_each_overlay_renders_and_every_pod_loads_its_settings(folder, monkeypatch):
    """kubectl kustomize renders the folder; each Deployment's environment as rendered (the
    ConfigMap plus its own env values) is accepted by the settings of the service it runs."""
    from libs.common.settings import load_settings

    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    config = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    if folder.name != "monitoring":  # monitoring renders the base too, plus its rules and monitors
        assert DEPLOYED <= set(deployments)
    for name, d in deployments.items():
        spec = d["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(config[source["configMapRef"]["name"]])  # the generated (hashed) name resolves
        env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
        for key in [k for k in os.environ if k.startswith("KLINEBUS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        load_settings(app_module(container["args"][1]).SETTINGS)
        if folder.name == "gpu" and name in ("trainer", "vlm"):
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert container["resources"]["limits"]["memory"]  # merged into, not replaced
            assert spec["tolerations"] and spec["nodeSelector"]
        else:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    if folder.name == "gpu":
        trainer = deployments["trainer"]["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "KLINEBUS_DEVICE", "value": "cuda"} in trainer["env"]
        assert {"name": "KLINEBUS_TORCH_THREADS", "value": "1"} in trainer["env"]  # base env kept
