"""The model package format: write, read, verify, the registry (local and fsspec) and the Hub upload plan."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from libs.common import model_package as mp

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _tiny_onnx(path: Path, scale: float = 2.0) -> Path:
    """y[batch, 1] = scale * x[batch, 3] summed: a real ONNX graph with its weight inside."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 1], [scale] * 3)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def _meta(**over) -> mp.ModelPackage:
    fields = dict(
        name="tiny-BTCUSDT-1h",
        version="1",
        kind="lstm-close",
        inputs=[mp.TensorSpec(name="x", dtype="float32", shape=["batch", 3])],
        outputs=[mp.TensorSpec(name="y", dtype="float32", shape=["batch", 1], meaning="scaled close t+1")],
        feature_set="test-3",
        features=["a", "b", "c"],
        targets=["close"],
        lookback=1,
        horizons=[1],
        scalers={"inputs": mp.Scaler(kind="standard", columns=["a", "b", "c"], center=[0, 0, 0], scale=[1, 1, 1])},
        serves=[mp.Served(symbol="BTCUSDT", interval="1h")],
        ranges=mp.Ranges(
            train=mp.TimeRange(start=0, end=10, rows=11),
            validation=mp.TimeRange(start=20, end=30, rows=11),
            test=mp.TimeRange(start=40, end=50, rows=11),
            embargo=2,
        ),
        metrics={"mae": 1.0},
        baseline_metrics={"persistence": {"mae": 2.0}},
        promoted=True,
        promotion_reason="validation MAE 1.0 < persistence 2.0",
        sha256="",
        code_version="test",
    )
    fields.update(over)
    return mp.ModelPackage(**fields)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    onnx_file = _tiny_onnx(tmp_path / "src.onnx")
    mp.write_package(tmp_path / "pkg", _meta(), onnx_file, "---\nlicense: mit\n---\n# tiny\n")
    return tmp_path / "pkg"


def test_write_read_verify_round_trip(package: Path):
    meta = mp.verify_package(package)
    assert meta.sha256 == mp.sha256_file(package / mp.MODEL_FILE)
    assert len(meta.sha256) == 64
    assert meta.features == ["a", "b", "c"]
    assert meta.serves_pair("BTCUSDT", "1h") and not meta.serves_pair("BTCUSDT", "15m")
    on_disk = json.loads((package / mp.META_FILE).read_text())
    assert on_disk["sha256"] == meta.sha256 and on_disk["format"] == mp.PACKAGE_FORMAT


def test_verify_refuses_a_changed_model(package: Path, tmp_path: Path):
    _tiny_onnx(package / mp.MODEL_FILE, scale=3.0)
    with pytest.raises(mp.PackageError, match="sha256"):
        mp.verify_package(package)


def test_verify_refuses_an_announced_hash_that_differs(package: Path):
    with pytest.raises(mp.PackageError, match="announced"):
        mp.verify_package(package, expected_sha256="0" * 64)


def test_verify_refuses_graph_names_that_differ(tmp_path: Path):
    onnx_file = _tiny_onnx(tmp_path / "src.onnx")
    meta = _meta(inputs=[mp.TensorSpec(name="window", dtype="float32", shape=["batch", 3])])
    mp.write_package(tmp_path / "pkg", meta, onnx_file, "card")
    with pytest.raises(mp.PackageError, match="graph inputs"):
        mp.verify_package(tmp_path / "pkg")


def test_verify_refuses_a_truncated_model(package: Path):
    data = (package / mp.MODEL_FILE).read_bytes()[:20]
    (package / mp.MODEL_FILE).write_bytes(data)
    meta = json.loads((package / mp.META_FILE).read_text())
    meta["sha256"] = mp.sha256_file(package / mp.MODEL_FILE)
    (package / mp.META_FILE).write_text(json.dumps(meta))
    mp.write_manifest(package)  # a consistent package whose model file is not ONNX
    with pytest.raises(mp.PackageError, match="not a readable ONNX"):
        mp.verify_package(package)


def test_malformed_metadata_is_one_line(package: Path):
    meta = json.loads((package / mp.META_FILE).read_text())
    meta["version"] = "01"
    (package / mp.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(mp.PackageError, match="field version") as e:
        mp.read_package(package)
    assert "\n" not in str(e.value)
    (package / mp.META_FILE).write_text("{not json")
    with pytest.raises(mp.PackageError, match="not JSON"):
        mp.read_package(package)


def test_schema_refuses_impossible_values():
    with pytest.raises(ValueError, match="follow each other"):
        _meta(ranges=mp.Ranges(
            train=mp.TimeRange(start=0, end=30, rows=1),
            validation=mp.TimeRange(start=20, end=30, rows=1),
            test=mp.TimeRange(start=40, end=50, rows=1),
        ))
    with pytest.raises(ValueError, match="model name"):
        _meta(name="../escape")
    with pytest.raises(ValueError, match="same length"):
        mp.Scaler(kind="standard", columns=["a"], center=[0, 1], scale=[1])
    with pytest.raises(ValueError, match="horizons"):
        _meta(horizons=[2, 1])


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_registry_versions_only_grow(package: Path, tmp_path: Path, url_kind: str):
    import uuid

    url = str(tmp_path / "registry") if url_kind == "local" else f"memory://reg-{uuid.uuid4().hex}"
    reg = mp.Registry(url)
    first = reg.publish(package)
    second = reg.publish(package)
    assert (first.version, second.version) == ("1", "2")
    assert reg.versions("tiny-BTCUSDT-1h") == ["1", "2"]
    assert reg.models() == ["tiny-BTCUSDT-1h"]
    assert reg.read("tiny-BTCUSDT-1h", "2").version == "2"
    assert reg.latest("tiny-BTCUSDT-1h") == "2"
    # a folder a crashed writer left under the next number is skipped, never reused
    reg.fs.makedirs(reg.path("tiny-BTCUSDT-1h", "3"), exist_ok=True)
    assert reg.versions("tiny-BTCUSDT-1h") == ["1", "2"]
    fourth = reg.publish(package)
    assert fourth.version == "4"
    assert reg.verify("tiny-BTCUSDT-1h", "4", expected_sha256=fourth.sha256).sha256 == first.meta.sha256
    with pytest.raises(mp.PackageError, match="announced"):  # v1's digest names v1's klinebus.json, not v4's
        reg.verify("tiny-BTCUSDT-1h", "4", expected_sha256=first.sha256)
    assert not [p for p in reg.fs.ls(reg.path("tiny-BTCUSDT-1h"), detail=False) if mp.STAGING_PREFIX in p]


def test_fetch_package_from_fsspec_url_verifies_and_caches(package: Path, tmp_path: Path):
    import uuid

    reg = mp.Registry(f"memory://reg-{uuid.uuid4().hex}")
    pub = reg.publish(package)
    assert pub.uri.startswith("memory://")
    local, meta = mp.fetch_package(pub.uri, pub.sha256, tmp_path / "cache")
    assert meta.version == pub.version
    assert mp.package_digest(local) == pub.sha256
    assert mp.sha256_file(local / mp.MODEL_FILE) == meta.sha256
    import onnxruntime as ort

    sess = ort.InferenceSession(str(local / mp.MODEL_FILE), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((4, 3), np.float32)})
    assert y.shape == (4, 1) and np.allclose(y, 6.0)
    with pytest.raises(mp.PackageError, match="announced"):
        mp.fetch_package(pub.uri, "f" * 64, tmp_path / "cache2")


def test_local_registry_uri_is_a_path_fetch_accepts(package: Path, tmp_path: Path):
    reg = mp.Registry(tmp_path / "registry")
    pub = reg.publish(package)
    assert Path(pub.uri) == tmp_path / "registry" / "tiny-BTCUSDT-1h" / "1"
    local, meta = mp.fetch_package(pub.uri, pub.sha256, tmp_path / "cache")
    assert local == Path(pub.uri) and meta.promoted


def test_hub_upload_plan(package: Path):
    hub = mp.HubPublisher("my-org/{model}", token="hf_test")
    plan = hub.plan(package)
    assert plan.repo_id == "my-org/tiny-BTCUSDT-1h"
    assert plan.tag == "v1"
    assert sorted(rel for rel, _ in plan.files) == sorted([mp.CARD_FILE, mp.META_FILE, mp.MODEL_FILE, mp.MANIFEST_FILE])
    with pytest.raises(mp.PackageError, match="repo id and a token"):
        mp.HubPublisher("my-org/x", token="")


# --------------------------------------------------------------------------- Hugging Face Hub
# A local Hub: the HTTP endpoints huggingface_hub 2.4 calls to create a repo, list refs, validate a
# card's YAML, pre-upload (every file answered "regular", so no LFS/Xet transfer), commit (ndjson,
# base64 contents), tag, and then resolve/download a pinned revision. It stores what it is sent,
# so the test checks the round trip, not a recording of itself.

class FakeHub:
    def __init__(self):
        self.requests = []; self.validated = []; self.repos = {}  # repo -> {"commits": [(oid, files)], "tags": {}}
        hub = self
        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""
            def send(self, status, obj=None, raw=None, headers=None, ctype="application/json"):
                body = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items(): self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD": self.wfile.write(body)
            def do_GET(self): hub.handle(self, "GET")
            def do_POST(self): hub.handle(self, "POST")
            def do_HEAD(self): hub.handle(self, "HEAD")
            def log_message(self, *a): pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, h, method):
        body = h._body() if method == "POST" else b""
        path = urllib.parse.urlparse(h.path).path
        self.requests.append((method, path, h.headers.get("authorization")))
        m = re.fullmatch(r"/api/repos/create", path)
        if m and method == "POST":
            req = json.loads(body); rid = f"{req['organization']}/{req['name']}"
            if rid in self.repos: return h.send(409, {"error": "You already created this model repo", "url": f"{self.url}/{rid}"})
            self.repos[rid] = {"commits": [], "tags": {}, "private": req.get("private", req.get("visibility"))}
            return h.send(200, {"url": f"{self.url}/{rid}", "name": rid})
        if path == "/api/validate-yaml":
            self.validated.append(json.loads(body)["content"])
            return h.send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path)
        if m:
            r = self.repos[m[1]]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid} for t, oid in r["tags"].items()]
            head = r["commits"][-1][0] if r["commits"] else "0" * 40
            return h.send(200, {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}], "converts": [], "tags": tags})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if m:
            files = json.loads(body)["files"]
            return h.send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if m:
            r = self.repos[m[1]]
            files = dict(r["commits"][-1][1]) if r["commits"] else {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
            r["commits"].append((oid, files))
            return h.send(200, {"commitUrl": f"{self.url}/{m[1]}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tag/(.+)", path)
        if m:
            r = self.repos[m[1]]; tag = json.loads(body)["tag"]
            r["tags"][tag] = urllib.parse.unquote(m[2])
            return h.send(200, {})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            oid, files = self._resolve(m[1], urllib.parse.unquote(m[2]))
            if oid is None: return h.send(404, {"error": "Revision Not Found"}, headers={"X-Error-Code": "RevisionNotFound"})
            return h.send(200, {"id": m[1], "modelId": m[1], "sha": oid, "private": True,
                                "siblings": [{"rfilename": f} for f in sorted(files)]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if m:
            oid, files = self._resolve(m[1], urllib.parse.unquote(m[2]))
            if oid is None: return h.send(404, {"error": "Revision Not Found"}, headers={"X-Error-Code": "RevisionNotFound"})
            return h.send(200, [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in sorted(files.items())])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            oid, files = self._resolve(m[1], urllib.parse.unquote(m[2]))
            name = urllib.parse.unquote(m[3])
            if oid is None or name not in files: return h.send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
            data = files[name]
            return h.send(200, raw=data, ctype="application/octet-stream",
                          headers={"X-Repo-Commit": oid, "ETag": '"' + hashlib.sha1(data).hexdigest() + '"'})
        h.send(404, {"error": "not implemented"})

    def _resolve(self, repo, rev):
        r = self.repos.get(repo)
        if r is None: return None, None
        for oid, files in r["commits"]:
            if oid == rev or r["tags"].get(rev) == oid: return oid, files
        if rev == "main" and r["commits"]: return r["commits"][-1]
        return None, None

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


def test_hub_publish_and_fetch_by_pinned_revision(package: Path, tmp_path: Path, hub):
    publisher = mp.HubPublisher("my-org/{model}", token="hf_secret", endpoint=hub.url)
    pub = publisher.publish(package)
    repo = hub.repos["my-org/tiny-BTCUSDT-1h"]
    (oid, files), = repo["commits"]
    assert pub.uri == f"hf://my-org/tiny-BTCUSDT-1h@{oid}" and repo["tags"] == {"v1": oid}
    assert repo["private"] in (True, "private")
    assert files[mp.MODEL_FILE] == (package / mp.MODEL_FILE).read_bytes()
    assert sorted(files) == sorted([mp.CARD_FILE, mp.META_FILE, mp.MODEL_FILE, mp.MANIFEST_FILE])
    assert pub.sha256 == hashlib.sha256(files[mp.MANIFEST_FILE]).hexdigest()
    assert hub.validated and hub.validated[0].startswith("---")  # the card's front matter was checked
    assert all(auth == "Bearer hf_secret" for _, _, auth in hub.requests)
    # versions only grow on the Hub too
    with pytest.raises(mp.PackageError, match="versions only grow"):
        publisher.publish(package)
    local, meta = mp.fetch_package(pub.uri, pub.sha256, tmp_path / "cache", token="hf_secret", endpoint=hub.url)
    assert mp.package_digest(local) == pub.sha256 and (local / mp.MODEL_FILE).read_bytes() == files[mp.MODEL_FILE]
    assert sorted(p.name for p in local.iterdir()) == sorted([mp.CARD_FILE, mp.META_FILE, mp.MODEL_FILE, mp.MANIFEST_FILE])
    with pytest.raises(mp.PackageError, match="announced"):
        mp.fetch_package(pub.uri, "e" * 64, tmp_path / "cache3", token="hf_secret", endpoint=hub.url)
    with pytest.raises(mp.PackageError, match="hf://<repo_id>@<revision>"):
        mp.fetch_package("hf://my-org/x", pub.sha256, tmp_path / "cache4")


# ------------------------------------------------------------ every file hashed; nothing leaves the package


@pytest.fixture
def text_package(tmp_path: Path) -> tuple[Path, str]:
    """A package with a tokenizer folder, published to a local registry; returns (folder, announced digest)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\n[UNK]\nup\ndown\n")
    (tok / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    mp.write_package(tmp_path / "src", _meta(), _tiny_onnx(tmp_path / "src.onnx"), "card", tokenizer_dir=tok)
    pub = mp.Registry(tmp_path / "registry").publish(tmp_path / "src")
    return Path(pub.uri), pub.sha256


def test_manifest_lists_every_file_and_the_digest_is_its_sha256(text_package):
    folder, digest = text_package
    files, got = mp.read_manifest(folder)
    assert sorted(files) == sorted([mp.CARD_FILE, mp.META_FILE, mp.MODEL_FILE, "tokenizer/tokenizer_config.json", "tokenizer/vocab.txt"])
    assert got == digest == hashlib.sha256((folder / mp.MANIFEST_FILE).read_bytes()).hexdigest()
    for rel, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    assert mp.verify_package(folder, digest).name == "tiny-BTCUSDT-1h"


def test_klinebus_json_changed_after_announcement_is_refused(text_package):
    folder, digest = text_package
    meta = json.loads((folder / mp.META_FILE).read_text())
    meta["features"] = ["c", "b", "a"]  # same model.onnx, other feature order: wrong answers, nothing else changed
    (folder / mp.META_FILE).write_text(json.dumps(meta, indent=2))
    with pytest.raises(mp.PackageError, match="klinebus.json sha256"):
        mp.verify_package(folder, digest)
    mp.write_manifest(folder)  # the manifest rewritten to match: now it is not the one announced
    with pytest.raises(mp.PackageError, match="announced"):
        mp.verify_package(folder, digest)


def test_tokenizer_file_changed_or_added_after_announcement_is_refused(text_package):
    folder, digest = text_package
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\ndown\nup\n")
    with pytest.raises(mp.PackageError, match="tokenizer/vocab.txt sha256"):
        mp.verify_package(folder, digest)


def test_a_file_the_manifest_does_not_list_is_refused(text_package):
    folder, digest = text_package
    (folder / "tokenizer" / "added_tokens.json").write_text('{"buy": 5}')  # a tokenizer folder is read whole
    with pytest.raises(mp.PackageError, match="added_tokens.json is not in"):
        mp.verify_package(folder, digest)


def test_a_symbolic_link_in_a_package_is_refused(text_package, tmp_path: Path):
    folder, digest = text_package
    (tmp_path / "outside.txt").write_text("x")
    (folder / "tokenizer" / "vocab.txt").unlink()
    (folder / "tokenizer" / "vocab.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(mp.PackageError, match="symbolic link"):
        mp.verify_package(folder, digest)


def test_a_manifest_naming_a_path_outside_the_package_is_refused(package: Path):
    doc = json.loads((package / mp.MANIFEST_FILE).read_text())
    doc["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (package / mp.MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(mp.PackageError, match="leaves the package"):
        mp.verify_package(package)


def test_a_format_1_package_without_manifest_is_refused(package: Path):
    (package / mp.MANIFEST_FILE).unlink()
    with pytest.raises(mp.PackageError, match="no klinebus.manifest.json"):
        mp.verify_package(package)


@pytest.mark.parametrize("name", ["/etc", "../other", "tokenizer/../../x", "a//b", "C:/x", ""])
def test_inside_refuses_paths_that_leave_the_package(package: Path, name: str):
    with pytest.raises(mp.PackageError):
        mp.inside(package, name)


def test_inside_refuses_a_symbolic_link_out_and_accepts_a_folder_in(package: Path, tmp_path: Path):
    (package / "tokenizer").mkdir()
    assert mp.inside(package, "tokenizer/") == (package / "tokenizer").resolve()
    (package / "tok2").symlink_to(tmp_path)
    with pytest.raises(mp.PackageError, match="outside the package"):
        mp.inside(package, "tok2")


def test_sources_allow_only_configured_roots(tmp_path: Path):
    reg = tmp_path / "registry"
    (reg / "m" / "1").mkdir(parents=True)
    src = mp.Sources(tmp_path / "cache", (str(reg), "s3://bucket/models", "hf://my-org"))
    for ok in [str(reg / "m" / "1"), f"file://{reg}/m/1", "s3://bucket/models/m/1", "hf://my-org/m@abc"]:
        src.check(ok)
    for bad in ["/etc", str(tmp_path / "registry-evil" / "m"), f"{reg}/../../etc", "s3://bucket/other/m",
                "s3://bucket/models/../secrets", "memory://bucket/models/m", "hf://other-org/m@abc",
                "hf://my-org-evil/m@abc", "hf://my-org/../x@abc", "http://169.254.169.254/latest/meta-data"]:
        with pytest.raises(mp.PackageError, match="not under a configured model source"):
            src.check(bad)


def test_fetch_with_sources_refuses_a_uri_outside_them_before_reading(package: Path, tmp_path: Path):
    pub = mp.Registry(tmp_path / "registry").publish(package)
    elsewhere = mp.Registry(tmp_path / "elsewhere").publish(package)  # a sound package, in the wrong place
    src = mp.Sources(tmp_path / "cache", (str(tmp_path / "registry"),))
    assert mp.fetch_package(pub.uri, pub.sha256, src)[1].version == "1"
    with pytest.raises(mp.PackageError, match="not under a configured model source"):
        mp.fetch_package(elsewhere.uri, elsewhere.sha256, src)
    with pytest.raises(mp.PackageError, match="64 lower-case hex"):
        mp.fetch_package(pub.uri, "", src)
