"""The model package: the immutable folder the trainer writes, the registry stores and inference loads.

Layout (../shared/DESIGN.md, "Model packages")::

    <registry>/<model-name>/<version>/
      model.onnx      one self-contained ONNX file (weights inside), dynamic batch
      klinebus.json   ``ModelPackage`` below: what serving needs and what the model is
      README.md       model card (Hugging Face format: YAML front matter, then the numbers)
      tokenizer/      only for models that read text

Versions are positive integers written as decimal strings (``"1"``, ``"2"``, ...); they only grow.
A registry is a local folder or any fsspec URL (``memory://``, ``s3://``, ...). Publishing writes the
package under a hidden staging name, verifies it there and only then moves it to its version, so a
reader (or a crash) never sees half a package. On object stores the move is a copy followed by a
delete; readers still only look at version folders that hold a ``klinebus.json`` whose sha256 checks.

The Hugging Face Hub is a second registry (``HubPublisher``): one repository per model name, one
commit per version, tagged ``v<version>``; ``models.v1`` then announces ``hf://<repo>@<commit>``, a
pinned revision that ``fetch_package`` downloads with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGE_FORMAT = 1
MODEL_FILE = "model.onnx"
META_FILE = "klinebus.json"
CARD_FILE = "README.md"
TOKENIZER_DIR = "tokenizer"
STAGING_PREFIX = ".staging-"
HF_SCHEME = "hf://"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class PackageError(ValueError):
    """A package that is missing, malformed or does not match what was announced (one line)."""


# --------------------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One ONNX graph input or output. Symbolic dimensions (``"batch"``) are strings."""

    name: str
    dtype: Literal["float32", "float64", "int64", "int32", "uint8", "bool", "string"]
    shape: list[int | str]
    meaning: str = ""


class Scaler(_Strict):
    """An affine per-column scaling fitted on the training slice only: ``scaled = (x - center) / scale``.

    A standard scaler has center = mean and scale = std; a min-max scaler center = min and
    scale = max - min. Zero scales are stored as 1 (a constant column stays constant).
    """

    kind: Literal["standard", "minmax"]
    columns: list[str]
    center: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _lengths(self) -> Scaler:
        if not (len(self.columns) == len(self.center) == len(self.scale)):
            raise ValueError("scaler columns, center and scale must have the same length")
        if any(s == 0 for s in self.scale):
            raise ValueError("scaler scale must be non-zero")
        return self


class Served(_Strict):
    symbol: str
    interval: str


class TimeRange(_Strict):
    """A slice of the data by candle open time (ms, both ends inclusive) and its sample count."""

    start: int
    end: int
    rows: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end < self.start:
            raise ValueError(f"range end {self.end} is before its start {self.start}")
        return self


class Ranges(_Strict):
    train: TimeRange
    validation: TimeRange
    test: TimeRange
    embargo: int = Field(0, ge=0, description="candles left out between consecutive slices")

    @model_validator(mode="after")
    def _later(self) -> Ranges:
        if not (self.train.end < self.validation.start and self.validation.end < self.test.start):
            raise ValueError("train, validation and test ranges must follow each other in time")
        return self


class ModelPackage(_Strict):
    """``klinebus.json``."""

    format: int = PACKAGE_FORMAT
    name: str
    version: str = Field(description="positive integer as a decimal string; versions only grow")
    kind: str = Field(description="bilstm-ohlc, lstm-close, chart-classifier, ...")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_set: str
    features: list[str] = Field(description="feature names in the order of the input's last axis")
    skipped_features: dict[str, str] = Field(
        default_factory=dict, description="features of the set left out, with the reason"
    )
    targets: list[str] = Field(default_factory=list, description="what the outputs forecast, in order")
    lookback: int = Field(ge=1)
    horizons: list[int] = Field(description="candles ahead each forecast step refers to")
    scalers: dict[str, Scaler] = Field(default_factory=dict)
    input_scaling: Literal["in-graph", "caller"] = Field(
        "in-graph",
        description="in-graph: feed raw feature values, the graph applies scalers['inputs'] (and decodes "
        "its outputs to prices) itself; caller: scale inputs with scalers['inputs'] before running it",
    )
    serves: list[Served]
    ranges: Ranges
    metrics: dict[str, float]
    baseline_metrics: dict[str, dict[str, float]]
    promoted: bool
    promotion_reason: str = ""
    sha256: str = Field(description="sha256 of model.onnx")
    code_version: str
    created_at: int = Field(default_factory=lambda: int(time.time() * 1000))
    config: dict[str, Any] = Field(default_factory=dict, description="the whole training config")
    evaluation: dict[str, Any] = Field(
        default_factory=dict, description="full scorecards (validation, test, walk-forward folds, export check)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} must match {_NAME.pattern}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.isdigit() or int(v) < 1 or v != str(int(v)):
            raise ValueError(f"version {v!r} must be a positive integer without leading zeros")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if v and not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return v

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v) or sorted(set(v)) != v:
            raise ValueError("horizons must be a non-empty increasing list of positive integers")
        return v

    def serves_pair(self, symbol: str, interval: str) -> bool:
        return any(s.symbol == symbol and s.interval == interval for s in self.serves)


# ------------------------------------------------------------------------------ files and hashes


def sha256_file(path: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(str(path), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """``klinebus <version>+g<commit>`` where a git checkout is at hand, else the installed version."""
    try:
        from importlib.metadata import version

        base = version("klinebus")
    except Exception:
        base = "0+unknown"
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{base}+g{sha}" if sha else base
    except Exception:
        return base


def write_package(
    directory: str | Path,
    meta: ModelPackage,
    onnx_file: str | Path,
    card: str,
    tokenizer_dir: str | Path | None = None,
) -> ModelPackage:
    """Write a package into a new local ``directory``; fills in ``sha256``; returns the final metadata."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(onnx_file, directory / MODEL_FILE)
    meta = meta.model_copy(update={"sha256": sha256_file(directory / MODEL_FILE)})
    ModelPackage.model_validate(meta.model_dump())  # the copy bypasses validation
    (directory / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
    (directory / CARD_FILE).write_text(card)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / TOKENIZER_DIR)
    return meta


def _parse_meta(text: str, where: str) -> ModelPackage:
    try:
        return ModelPackage.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise PackageError(f"{where}: {META_FILE} is not JSON ({e.msg} at line {e.lineno})") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise PackageError(f"{where}: {META_FILE} field {loc}: {first['msg']}") from None


def read_package(directory: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> ModelPackage:
    """Parse ``klinebus.json`` (no hash check; use ``verify_package`` before loading the model)."""
    path = f"{str(directory).rstrip('/')}/{META_FILE}"
    try:
        if fs is None:
            text = Path(path).read_text()
        else:
            with fs.open(path, "r") as f:
                text = f.read()
    except FileNotFoundError:
        raise PackageError(f"{directory}: no {META_FILE}") from None
    return _parse_meta(text, str(directory))


def verify_package(
    directory: str | Path,
    expected_sha256: str | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
    check_graph: bool = True,
) -> ModelPackage:
    """Check a package before it is used; raises ``PackageError`` with one line saying what is wrong.

    Checks: ``klinebus.json`` parses; ``model.onnx`` exists and its sha256 equals the one recorded
    (and ``expected_sha256``, the one announced on ``models.v1``); the card exists; and, where the
    ``onnx`` package is installed and the package is local, the graph's input and output names are
    those recorded.
    """
    meta = read_package(directory, fs)
    base = str(directory).rstrip("/")
    model_path = f"{base}/{MODEL_FILE}"
    exists = (fs.exists if fs is not None else os.path.exists)
    if not exists(model_path):
        raise PackageError(f"{directory}: no {MODEL_FILE}")
    if not exists(f"{base}/{CARD_FILE}"):
        raise PackageError(f"{directory}: no {CARD_FILE} (model card)")
    actual = sha256_file(model_path, fs)
    if actual != meta.sha256:
        raise PackageError(f"{directory}: {MODEL_FILE} sha256 {actual[:12]}… differs from {META_FILE}'s {meta.sha256[:12]}…")
    if expected_sha256 is not None and actual != expected_sha256:
        raise PackageError(f"{directory}: {MODEL_FILE} sha256 {actual[:12]}… differs from the announced {expected_sha256[:12]}…")
    if check_graph and fs is None:
        try:
            import onnx
        except ImportError:
            return meta
        try:
            graph = onnx.load(model_path, load_external_data=False).graph
        except Exception as e:  # a truncated or foreign file
            raise PackageError(f"{directory}: {MODEL_FILE} is not a readable ONNX model ({type(e).__name__})") from None
        initializers = {i.name for i in graph.initializer}
        ins = [i.name for i in graph.input if i.name not in initializers]
        outs = [o.name for o in graph.output]
        if ins != [t.name for t in meta.inputs] or outs != [t.name for t in meta.outputs]:
            raise PackageError(f"{directory}: graph inputs {ins} / outputs {outs} differ from {META_FILE}'s")
        if any(i.HasField("data_location") and i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer):
            raise PackageError(f"{directory}: {MODEL_FILE} keeps weights outside the file")
    return meta


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PublishedPackage:
    name: str
    version: str
    uri: str
    sha256: str
    meta: ModelPackage


class Registry:
    """``<root>/<model-name>/<version>/`` on a local folder or any fsspec URL."""

    def __init__(self, url: str | Path, **storage_options: Any) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/") or "/"
        self._protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]

    def path(self, name: str, version: str | None = None) -> str:
        return f"{self.root}/{name}" + (f"/{version}" if version is not None else "")

    def uri(self, name: str, version: str) -> str:
        """The uri ``models.v1`` announces: a plain path for a local folder, an fsspec URL otherwise."""
        p = self.path(name, version)
        return p if self._protocol in ("file", "local") else f"{self._protocol}://{p.lstrip('/')}"

    def models(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(
            Path(p).name for p in self.fs.ls(self.root, detail=False)
            if not Path(p).name.startswith(".") and self.fs.isdir(p)
        )

    def versions(self, name: str) -> list[str]:
        """Complete versions of a model (those with ``klinebus.json``), oldest first."""
        base = self.path(name)
        if not self.fs.exists(base):
            return []
        found = []
        for p in self.fs.ls(base, detail=False):
            v = Path(p).name
            if v.isdigit() and self.fs.exists(f"{p.rstrip('/')}/{META_FILE}"):
                found.append(int(v))
        return [str(v) for v in sorted(found)]

    def _all_numbered(self, name: str) -> list[int]:
        base = self.path(name)
        if not self.fs.exists(base):
            return []
        return [int(Path(p).name) for p in self.fs.ls(base, detail=False) if Path(p).name.isdigit()]

    def next_version(self, name: str) -> str:
        """The version the next ``publish`` of ``name`` will get, barring a concurrent publisher."""
        return str(max(self._all_numbered(name), default=0) + 1)

    def latest(self, name: str, promoted_only: bool = False) -> str | None:
        for v in reversed(self.versions(name)):
            if not promoted_only or self.read(name, v).promoted:
                return v
        return None

    def read(self, name: str, version: str) -> ModelPackage:
        return read_package(self.path(name, version), self.fs)

    def verify(self, name: str, version: str, expected_sha256: str | None = None) -> ModelPackage:
        local = self._protocol in ("file", "local")
        return verify_package(self.path(name, version), expected_sha256, None if local else self.fs)

    def publish(self, staged: str | Path) -> PublishedPackage:
        """Copy a locally written package in as the model's next version; returns where it went.

        The version in ``staged``'s ``klinebus.json`` is replaced by the next free one (a version
        folder that exists, even half-written by a crash, is never reused: versions only grow).
        """
        staged = Path(staged)
        meta = verify_package(staged)
        self.fs.makedirs(self.path(meta.name), exist_ok=True)
        for _attempt in range(20):
            version = self.next_version(meta.name)
            final_meta = meta.model_copy(update={"version": version})
            tmp = self.path(meta.name, f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
            self.fs.makedirs(tmp, exist_ok=False)
            try:
                for item in sorted(staged.rglob("*")):
                    rel = item.relative_to(staged).as_posix()
                    if item.is_dir():
                        self.fs.makedirs(f"{tmp}/{rel}", exist_ok=True)
                    elif rel == META_FILE:
                        with self.fs.open(f"{tmp}/{rel}", "w") as f:
                            f.write(final_meta.model_dump_json(indent=2) + "\n")
                    else:
                        self.fs.put_file(str(item), f"{tmp}/{rel}")
                verify_package(tmp, meta.sha256, None if self._protocol in ("file", "local") else self.fs)
                dest = self.path(meta.name, version)
                if self.fs.exists(dest):  # another publisher took this version meanwhile
                    self.fs.rm(tmp, recursive=True)
                    continue
                self.fs.mv(tmp, dest, recursive=True)
            except BaseException:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
                raise
            return PublishedPackage(meta.name, version, self.uri(meta.name, version), meta.sha256, final_meta)
        raise PackageError(f"could not allocate a version for {meta.name} in {self.url}")

    def clean_staging(self, name: str) -> int:
        """Remove staging folders a crashed publisher left behind; returns how many."""
        base = self.path(name)
        if not self.fs.exists(base):
            return 0
        stale = [p for p in self.fs.ls(base, detail=False) if Path(p).name.startswith(STAGING_PREFIX)]
        for p in stale:
            self.fs.rm(p, recursive=True)
        return len(stale)


def fetch_package(
    uri: str,
    expected_sha256: str,
    cache_dir: str | Path,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, ModelPackage]:
    """Bring an announced package to a local folder and verify it against the announced sha256.

    ``uri`` is a local path, an fsspec URL or ``hf://<repo_id>@<revision>``. Remote packages are
    downloaded beside ``cache_dir/<sha256>``, verified there and only then renamed to it, so the
    cache never holds a copy that does not match its name; a cached copy is re-verified, not trusted.
    """
    if not uri.startswith(HF_SCHEME):
        fs, path = fsspec.core.url_to_fs(uri)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("file", "local"):
            return Path(path), verify_package(path, expected_sha256)
    else:
        repo_id, _, revision = uri[len(HF_SCHEME):].partition("@")
        if not repo_id or not revision:
            raise PackageError(f"{uri}: a Hub uri is hf://<repo_id>@<revision>")
    dest = Path(cache_dir) / expected_sha256
    if dest.exists():
        return dest, verify_package(dest, expected_sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        if uri.startswith(HF_SCHEME):
            from huggingface_hub import snapshot_download

            snapshot_download(repo_id, revision=revision, local_dir=tmp, token=token, endpoint=endpoint)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's own bookkeeping
        else:
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        meta = verify_package(tmp, expected_sha256)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, meta


# ---------------------------------------------------------------------------------- Hugging Face


@dataclass(frozen=True)
class UploadPlan:
    """What ``HubPublisher.publish`` sends: one commit adding every file, then a version tag."""

    repo_id: str
    files: list[tuple[str, Path]]  # (path in repo, local file)
    commit_message: str
    tag: str


class HubPublisher:
    """Publishes packages to the Hugging Face Hub; one repository per model name.

    ``repo_id`` may hold ``{model}`` (e.g. ``my-org/{model}``), filled with the package's name; a
    repo id without it serves a single model. ``token`` comes from the environment
    (``KLINEBUS_HF_TOKEN``); ``endpoint`` points at another Hub (a mirror, a test server).
    """

    def __init__(self, repo_id: str, token: str, endpoint: str | None = None, private: bool = True) -> None:
        if not repo_id or not token:
            raise PackageError("Hub publishing needs both a repo id and a token")
        self.repo_template = repo_id
        self.token = token
        self.endpoint = endpoint
        self.private = private

    def repo_for(self, name: str) -> str:
        return self.repo_template.replace("{model}", name)

    def plan(self, package_dir: str | Path) -> UploadPlan:
        package_dir = Path(package_dir)
        meta = verify_package(package_dir)
        files = [(p.relative_to(package_dir).as_posix(), p) for p in sorted(package_dir.rglob("*")) if p.is_file()]
        return UploadPlan(
            repo_id=self.repo_for(meta.name),
            files=files,
            commit_message=f"{meta.name} v{meta.version} ({meta.kind}, promoted={meta.promoted}, sha256 {meta.sha256[:12]})",
            tag=f"v{meta.version}",
        )

    def publish(self, package_dir: str | Path) -> PublishedPackage:
        """Upload one package as one commit and tag it; returns ``hf://<repo>@<commit>``."""
        from huggingface_hub import CommitOperationAdd, HfApi

        plan = self.plan(package_dir)
        meta = read_package(package_dir)
        api = HfApi(endpoint=self.endpoint, token=self.token)
        api.create_repo(plan.repo_id, private=self.private, exist_ok=True)
        refs = api.list_repo_refs(plan.repo_id)
        existing = [int(t.name[1:]) for t in refs.tags if re.fullmatch(r"v\d+", t.name)]
        if existing and int(meta.version) <= max(existing):
            raise PackageError(
                f"{plan.repo_id} already has v{max(existing)}; versions only grow (package is v{meta.version})"
            )
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local)) for rel, local in plan.files]
        info = api.create_commit(plan.repo_id, operations=ops, commit_message=plan.commit_message)
        api.create_tag(plan.repo_id, tag=plan.tag, revision=info.oid)
        return PublishedPackage(meta.name, meta.version, f"{HF_SCHEME}{plan.repo_id}@{info.oid}", meta.sha256, meta)
