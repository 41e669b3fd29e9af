"""The Kubernetes manifests a platform team applies: every overlay (dev, production) with every
subset of the components (monitoring, gpu, keda, network-policies) renders with kubectl's
kustomize, passes kubernetes-validate --strict against the API schemas, and checkov's Kubernetes
policy scan finds nothing: the restricted Pod Security profile (read-only root, ALL capabilities
dropped, seccomp RuntimeDefault, no privilege escalation, non-root, no service-account token),
probes, requests and limits, images by digest. The one exception is asserted, not skipped: without
the network-policies component, checkov's CKV2_K8S_6 (pods without a NetworkPolicy) fails, and
only that check fails; with it, nothing fails.

checkov pins packaging<24 and networkx<2.7, which conflict with the project's environment, so it
runs from its own venv, var/checkov (created here on first use: `python -m venv var/checkov &&
var/checkov/bin/pip install checkov==3.3.30`). kubernetes-validate is in the dev extra.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "production")
COMPONENTS = ("monitoring", "gpu", "keda", "network-policies")
COMBINATIONS = [(o, c) for o in OVERLAYS for n in range(len(COMPONENTS) + 1)
                for c in itertools.combinations(COMPONENTS, n)]
CHECKOV = "checkov==3.3.30"
CHECKOV_VENV = REPO / "var" / "checkov"
# Custom resources kubernetes-validate has no schema for (it warns and skips them).
CRDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
# The check only the network-policies component satisfies.
NETWORK_POLICY_CHECK = "CKV2_K8S_6"
PIPELINE = ("ingest", "archive", "features", "charts", "inference", "vlm", "trainer", "alerts")
# Each service's image (README "Deploying": one image per service; the archiver ships with ingest).
IMAGE = {**{s: s for s in PIPELINE}, "archive": "ingest"}


def _name(overlay: str, components: tuple[str, ...]) -> str:
    return "+".join((overlay, *components))


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if not path:
        pytest.skip("kubectl not on PATH (it renders the kustomizations)")
    return path


def render(tmp: Path, overlay: str, components: tuple[str, ...], extra: dict | None = None) -> list[dict]:
    """What `kubectl apply -k` would apply for an overlay you write as the README says: the overlay as
    a resource, the components listed beside it (``extra``: more fields of that kustomization)."""
    folder = tmp / _name(overlay, components)
    folder.mkdir(parents=True)
    rel = os.path.relpath(K8S, folder)
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
           "resources": [f"{rel}/overlays/{overlay}"], **(extra or {})}
    if components:
        doc["components"] = [f"{rel}/components/{c}" for c in components]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, f"{_name(overlay, components)} does not render: {out.stderr}"
    (folder / "rendered.yaml").write_text(out.stdout)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        docs = pool.map(lambda combination: render(tmp, *combination), COMBINATIONS)
        return {_name(*c): (tmp / _name(*c) / "rendered.yaml", d) for c, d in zip(COMBINATIONS, docs)}


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _by(docs, kind, name):
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_overlay_renders_with_every_subset_of_components(rendered):
    assert len(rendered) == len(OVERLAYS) * 2 ** len(COMPONENTS) == 32
    for name, (_, docs) in rendered.items():
        ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
        assert len(ids) == len(set(ids)), name
        # everything lands in the klinebus namespace (the dashboards once went to `default`)
        assert {ns for kind, ns, _ in ids if kind != "Namespace"} == {"klinebus"}, name


def distinct(rendered, keep=lambda name: True) -> tuple[list[dict], dict[str, list[str]]]:
    """The distinct objects of the chosen combinations (most are shared by many), each once, renamed
    apart where one name has several variants (gpu's trainer and the plain one), and for each the
    combinations it comes from: scanning these is scanning every combination, in one process."""
    seen: dict[str, tuple[dict, list[str]]] = {}
    variants: dict[tuple, int] = {}
    for name, (_, docs) in rendered.items():
        if not keep(name):
            continue
        for d in docs:
            key = json.dumps(d, sort_keys=True)
            if key not in seen:
                ident = (d["kind"], d["metadata"]["name"])
                variants[ident] = variants.get(ident, 0) + 1
                seen[key] = (d, [])
                if variants[ident] > 1:
                    d = json.loads(key)
                    d["metadata"]["name"] += f"-v{variants[ident]}"
                    seen[key] = (d, [])
            seen[key][1].append(name)
    docs = [d for d, _ in seen.values()]
    return docs, {f"{d['kind']}.{d['metadata'].get('namespace', 'default')}.{d['metadata']['name']}": names
                  for d, names in seen.values()}


def test_kubernetes_validate_strict_accepts_every_combination(rendered, tmp_path):
    docs, _ = distinct(rendered)
    path = tmp_path / "distinct.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    unknown = {line.split("for kind ")[1].split()[0] for line in (out.stdout + out.stderr).splitlines()
               if "Couldn't find schema" in line}
    assert unknown <= CRDS, out.stdout + out.stderr


def _checkov() -> str:
    exe = CHECKOV_VENV / "bin" / "checkov"
    if not exe.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True, capture_output=True)
            subprocess.run([str(CHECKOV_VENV / "bin" / "pip"), "install", "-q", CHECKOV], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"cannot install {CHECKOV} into {CHECKOV_VENV}: {exc}")
    return str(exe)


def _scan(checkov: str, path: Path) -> tuple[list[tuple[str, str]], int]:
    out = subprocess.run([checkov, "-f", str(path), "--framework", "kubernetes", "--quiet", "--compact",
                          "-o", "json"], capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads(out.stdout)
    report = report if isinstance(report, dict) else next(r for r in report if r["check_type"] == "kubernetes")
    assert report["summary"]["parsing_errors"] == 0, path
    return ([(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]],
            report["summary"]["passed"])


def test_checkov_finds_nothing_in_any_combination(rendered, tmp_path):
    checkov = _checkov()
    # Two scans: the combinations with network-policies (nothing may fail), and those without
    # (only the NetworkPolicy check may fail: it is that component's job). Its graph check pairs pods
    # with the policies of the same scan, so the two sets are never scanned together.
    scans = {"with network-policies": lambda n: "network-policies" in n,
             "without network-policies": lambda n: "network-policies" not in n}
    paths, origins = {}, {}
    for label, keep in scans.items():
        docs, origins[label] = distinct(rendered, keep)
        paths[label] = tmp_path / f"{label.replace(' ', '-')}.yaml"
        paths[label].write_text(yaml.safe_dump_all(docs))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(scans, pool.map(lambda label: _scan(checkov, paths[label]), scans)))
    problems = []
    for label, (failed, passed) in results.items():
        assert passed > 0, label
        if label == "without network-policies":
            assert {c for c, _ in failed} & {NETWORK_POLICY_CHECK}, "CKV2_K8S_6 passes without policies?"
            failed = [(c, r) for c, r in failed if c != NETWORK_POLICY_CHECK]
        for check, resource in sorted(failed):
            combos = origins[label].get(resource, [])
            problems.append(f"{check} {resource} (in {', '.join(combos[:3])}{', ...' if len(combos) > 3 else ''})")
    assert problems == [], "checkov failures:\n" + "\n".join(problems)


def test_skip_annotations_are_few_and_say_why(rendered):
    for name, (_, docs) in rendered.items():
        for d in _workloads(docs):
            notes = d["metadata"].get("annotations", {})
            skips = dict(v.partition("=")[::2] for k, v in notes.items() if k.startswith("checkov.io/skip"))
            for check, why in skips.items():
                assert len(why) > 40, (name, check, why)
            # secrets as files: the services (and redis_exporter) read them only from the environment
            allowed = {"CKV_K8S_35"}
            if name.startswith("dev") and d["metadata"]["name"] in PIPELINE:
                allowed |= {"CKV_K8S_15", "CKV_K8S_43"}  # the local image loaded into kind
            assert set(skips) <= allowed, (name, d["metadata"]["name"], skips)
            assert not [k for k in d["spec"]["template"]["metadata"].get("annotations", {}) if k.startswith("checkov")]


def test_every_pod_follows_the_restricted_profile(rendered):
    for name, (_, docs) in rendered.items():
        for d in _workloads(docs):
            pod = d["spec"]["template"]["spec"]
            where = f"{name} {d['metadata']['name']}"
            assert pod["automountServiceAccountToken"] is False, where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
                assert "livenessProbe" in c and "readinessProbe" in c, where
                # every path Python writes to under a read-only root is a volume
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                if d["metadata"]["name"] in PIPELINE:
                    assert {"/tmp", "/var/lib/klinebus", "/var/cache/klinebus"} <= mounts, where
                    env = {e["name"]: e.get("value") for e in c["env"]}
                    assert env["NUMBA_CACHE_DIR"].startswith("/var/cache/klinebus/"), where
                    assert env["HF_HOME"].startswith("/var/cache/klinebus/"), where


def test_the_pipeline_has_its_labels_ports_probes_and_disruption_budgets(rendered):
    _, docs = rendered["production"]
    for svc in PIPELINE:
        dep = _by(docs, "Deployment", svc)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == svc
        for key in ("part-of", "instance", "version", "component", "managed-by"):
            assert f"app.kubernetes.io/{key}" in dep["metadata"]["labels"], (svc, key)
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert c["args"] == ["run", svc]
        assert c["ports"] == [{"name": "http", "containerPort": 9000}]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
        pdb = _by(docs, "PodDisruptionBudget", svc)
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    config = _by(docs, "ConfigMap", next(d["metadata"]["name"] for d in docs if d["metadata"]["name"].startswith("klinebus-config")))
    assert config["data"]["KLINEBUS_HTTP_PORT"] == "9000"
    # the ordered services: an owner and a hot standby that takes over, rolled one at a time
    for svc in ("features", "inference"):
        dep = _by(docs, "Deployment", svc)
        assert dep["spec"]["replicas"] == 2
        assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_production_takes_the_redis_url_from_a_required_secret_and_pins_images_by_digest(rendered):
    for name, (_, docs) in rendered.items():
        if not name.startswith("production"):
            continue
        assert not [d for d in docs if d["metadata"]["name"] == "redis" and d["kind"] in ("StatefulSet", "Service")], name
        for svc in PIPELINE:
            (c,) = _by(docs, "Deployment", svc)["spec"]["template"]["spec"]["containers"]
            (url,) = [e for e in c["env"] if e["name"] == "KLINEBUS_REDIS_URL"]
            ref = url["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "klinebus-redis", "key": "KLINEBUS_REDIS_URL"}, (name, svc)  # not optional
        for d in _workloads(docs):
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert "@sha256:" in c["image"], (name, c["image"])
                if d["metadata"]["name"] in PIPELINE:
                    assert c["image"].startswith(f"ghcr.io/klinebus/klinebus-{IMAGE[d['metadata']['name']]}@"), (name, c["image"])


def test_dev_is_small_pulls_the_local_image_and_uses_redis_with_auth(rendered):
    _, docs = rendered["dev"]
    cpu = mem = 0.0
    for d in _workloads(docs):
        for c in d["spec"]["template"]["spec"]["containers"]:
            req = c["resources"]["requests"]
            cpu += d["spec"]["replicas"] * (float(req["cpu"][:-1]) / 1000 if req["cpu"].endswith("m") else float(req["cpu"]))
            mem += d["spec"]["replicas"] * float(req["memory"].removesuffix("Mi")) / 1024
    assert cpu <= 1.0 and mem <= 2.0, (cpu, mem)
    redis = _by(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    # AUTH with the password of the klinebus-redis Secret, read from its mounted file
    assert '--requirepass "$(cat /run/secrets/redis/password)"' in redis["args"][0]
    (auth,) = [v for v in _by(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    assert auth["secret"]["secretName"] == "klinebus-redis"
    for svc in PIPELINE:
        (c,) = _by(docs, "Deployment", svc)["spec"]["template"]["spec"]["containers"]
        # one image per service (the archiver ships in ingest's), built here and loaded into kind
        assert c["image"] == f"klinebus-{IMAGE[svc]}:dev" and c["imagePullPolicy"] == "IfNotPresent"
        names = [e["name"] for e in c["env"]]
        # $(REDIS_PASSWORD) expands only from a variable defined earlier in the list
        assert names.index("REDIS_PASSWORD") < names.index("KLINEBUS_REDIS_URL")
        (url,) = [e for e in c["env"] if e["name"] == "KLINEBUS_REDIS_URL"]
        assert url == {"name": "KLINEBUS_REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@redis:6379/0"}
    # the dev URL is one the services' settings accept once the variable is expanded
    from libs.common.settings import ServiceSettings

    assert ServiceSettings(redis_url="redis://:klinebus-dev-only@redis:6379/0").redis_url


def test_network_policies_deny_by_default_and_open_only_what_services_need(rendered):
    _, docs = rendered["dev+network-policies"]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    redis = policies["redis"]
    assert redis["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "redis"}}
    assert redis["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "klinebus"}}}],
                                 "ports": [{"protocol": "TCP", "port": 6379}]}]
    https = policies["allow-https-egress"]
    assert https["egress"] == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}]
    assert "ingest" in https["podSelector"]["matchExpressions"][0]["values"]
    # Redis itself gets no egress but DNS, and no pod is selected by an allow-all
    for name, spec in policies.items():
        for rule in spec.get("egress", []) + spec.get("ingress", []):
            assert rule.get("ports"), name


def test_keda_scales_the_competing_consumers_on_their_groups_lag_and_the_trainer_from_zero(rendered):
    _, docs = rendered["production+keda"]
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs if d["kind"] == "ScaledObject"}
    # competing consumers (libs/common/bus: bus.competing*): archive, vlm, alerts, trainer; charts
    # competes too but works on a cadence, and features/inference are ordered (owner + standby)
    assert sorted(scaled) == ["alerts", "archive", "trainer", "vlm"]
    topics = {"archive": "klines.v1", "vlm": "charts.v1", "alerts": "alerts.v1", "trainer": "datasets.v1"}
    for svc, spec in scaled.items():
        lag = spec["triggers"][0]
        assert lag["type"] == "redis-streams" and lag["authenticationRef"] == {"name": "klinebus-redis"}
        assert lag["metadata"]["stream"] == f"klinebus:{{{topics[svc]}}}"
        assert lag["metadata"]["consumerGroup"] == svc and "lagCount" in lag["metadata"]
    assert scaled["trainer"]["minReplicaCount"] == 0
    # a running job is pending, not lag: the second trigger keeps the pod until it is acknowledged
    assert scaled["trainer"]["triggers"][1]["metadata"]["pendingEntriesCount"] == "1"
    auth = _by(docs, "TriggerAuthentication", "klinebus-redis")["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"], a["key"]) for a in auth} == {
        ("address", "klinebus-redis", "address"), ("password", "klinebus-redis", "password")}


def test_the_stream_keys_keda_watches_are_the_bus_keys():
    from libs.common import topics

    scaled = (K8S / "components" / "keda" / "scaledobjects.yaml").read_text()
    for topic in (topics.KLINES, topics.CHARTS, topics.ALERTS, topics.DATASETS):
        assert f'stream: "{topics.stream_key(topic)}"' in scaled


def test_gpu_runs_trainer_and_vlm_on_the_cuda_image_with_one_gpu(rendered):
    _, docs = rendered["production+gpu"]
    for svc in ("trainer", "vlm"):
        (c,) = _by(docs, "Deployment", svc)["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"ghcr.io/klinebus/klinebus-{svc}@sha256:{'0' * 64}"  # the cuda build's, to set
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert _by(docs, "Deployment", svc)["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_monitoring_lands_in_the_namespace_with_a_release_label_an_overlay_can_change(rendered, tmp_path):
    _, docs = rendered["production+monitoring"]
    board = _by(docs, "ConfigMap", "klinebus-grafana-dashboards")
    assert board["metadata"]["namespace"] == "klinebus" and board["metadata"]["labels"]["grafana_dashboard"] == "1"
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert _by(docs, kind, "klinebus")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "redis-exporter" in _by(docs, "ServiceMonitor", "klinebus")["spec"]["selector"]["matchExpressions"][0]["values"]
    # the patch README and the component document, from the overlay a team applies
    patch = {"target": {"group": "monitoring.coreos.com", "labelSelector": "app.kubernetes.io/part-of=klinebus"},
             "patch": "- { op: replace, path: /metadata/labels/release, value: my-prometheus }"}
    docs = render(tmp_path, "production", ("monitoring",), {"patches": [patch]})
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert _by(docs, kind, "klinebus")["metadata"]["labels"]["release"] == "my-prometheus"
