"""A package's files: the manifest that hashes every one of them, writing, reading and verifying.

``klinebus.manifest.json`` lists every file of the package but itself (``klinebus.json``, the card,
``model.onnx``, each tokenizer file, ...) with its size and sha256, as sorted, compact JSON. The
package's digest is the sha256 of the manifest's bytes: ``models.v1`` announces it, so a change to
any file after the announcement (the feature order in ``klinebus.json``, a tokenizer file) is seen.

``verify_package`` refuses a package whose manifest differs from the announced digest, whose files
differ from the manifest, that holds a file the manifest does not list (a loader could read it:
a tokenizer folder is read whole), a symbolic link, or a name that leaves the folder. ``inside`` is
the one way to turn a path a package names (``config.text.tokenizer``) into a path: it must resolve
inside the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from libs.common.model_package.schema import (
    _SHA256,
    CARD_FILE,
    FAST_MODEL_FILE,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    TOKENIZER_DIR,
    ModelPackage,
    PackageError,
    parse_meta,
)

MANIFEST_FORMAT = 1
# Files a package may hold beside those listed: the Hub adds .gitattributes to every new repository.
IGNORED = frozenset({".gitattributes"})
_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a few dozen files; anything this large is not one


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
        root = Path(__file__).resolve().parents[3]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{base}+g{sha}" if sha else base
    except Exception:
        return base


# ------------------------------------------------------------------------------------ containment


def check_relative(name: str, where: str = "package") -> str:
    """``name`` as a relative POSIX path that stays inside its folder; ``PackageError`` otherwise."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise PackageError(f"{where}: {name!r} is not a relative file name")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/") or any(part in ("..", "") for part in name.split("/")) \
            or (len(p.parts) and ":" in p.parts[0]):
        raise PackageError(f"{where}: {name!r} leaves the package")
    return p.as_posix()


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a path a package names, refused unless it resolves inside ``folder``
    (``folder / "/abs"`` is ``/abs``; ``../x`` and symbolic links out are refused too)."""
    text = str(name).rstrip("/")
    if not text:
        raise PackageError(f"{folder}: an empty path")
    rel = check_relative(text, str(folder))
    base = Path(folder).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise PackageError(f"{folder}: {name!r} resolves outside the package")
    return target


# --------------------------------------------------------------------------------------- manifest


def manifest_bytes(files: dict[str, dict[str, Any]]) -> bytes:
    """The manifest's exact bytes: sorted, compact JSON and a newline."""
    doc = {"format": MANIFEST_FORMAT, "files": {k: files[k] for k in sorted(files)}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def digest_of(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()


def _local_files(directory: Path) -> list[str]:
    """Every file under ``directory`` as a relative name; a symbolic link is refused."""
    found = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        for n in list(dirs) + names:
            full = Path(root) / n
            if full.is_symlink():
                raise PackageError(f"{directory}: {full.relative_to(directory).as_posix()} is a symbolic link")
        for n in names:
            found.append((Path(root) / n).relative_to(directory).as_posix())
    return sorted(found)


def write_manifest(directory: str | Path) -> str:
    """List every file of a local package in its manifest; returns the package digest."""
    directory = Path(directory)
    files = {}
    for rel in _local_files(directory):
        if rel == MANIFEST_FILE or rel in IGNORED:
            continue
        p = directory / rel
        files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    data = manifest_bytes(files)
    (directory / MANIFEST_FILE).write_bytes(data)
    return digest_of(data)


def _read_bytes(path: str, fs: fsspec.AbstractFileSystem | None, limit: int) -> bytes:
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise PackageError(f"{path}: larger than {limit} bytes")
    return data


def read_manifest(directory: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> tuple[dict[str, dict], str]:
    """``(files, digest)``: the manifest's entries and the sha256 of its bytes."""
    base = str(directory).rstrip("/")
    try:
        data = _read_bytes(f"{base}/{MANIFEST_FILE}", fs, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise PackageError(f"{directory}: no {MANIFEST_FILE} (a format-1 package hashes only {MODEL_FILE}; "
                           "publish it again with this version)") from None
    try:
        doc = json.loads(data)
        files = doc["files"]
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("format")
        for name, entry in files.items():
            check_relative(name, str(directory))
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
                    and isinstance(entry.get("size"), int) and entry["size"] >= 0):
                raise ValueError(name)
    except PackageError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{directory}: {MANIFEST_FILE} is malformed ({type(e).__name__})") from None
    return files, digest_of(data)


def package_digest(directory: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """The digest ``models.v1`` announces for a package (sha256 of its manifest's bytes)."""
    return read_manifest(directory, fs)[1]


# ------------------------------------------------------------------------------ write, read, verify


def write_package(
    directory: str | Path,
    meta: ModelPackage,
    onnx_file: str | Path,
    card: str,
    tokenizer_dir: str | Path | None = None,
) -> ModelPackage:
    """Write a package into a new local ``directory``; fills in ``sha256``; writes the manifest last;
    returns the final metadata (``package_digest(directory)`` is what to announce).

    A fast serving variant the exporter left beside ``onnx_file`` (``FAST_MODEL_FILE``, kept by its
    check against the float graph) goes in too, named with its sha256 in ``config.fast_model``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(onnx_file, directory / MODEL_FILE)
    update: dict[str, Any] = {"sha256": sha256_file(directory / MODEL_FILE)}
    fast = Path(onnx_file).with_name(FAST_MODEL_FILE)
    if fast.is_file() and Path(onnx_file).name != FAST_MODEL_FILE:
        shutil.copyfile(fast, directory / FAST_MODEL_FILE)
        update["config"] = {**meta.config, "fast_model": {
            "file": FAST_MODEL_FILE, "sha256": sha256_file(directory / FAST_MODEL_FILE),
            "method": "onnxruntime dynamic int8 quantisation of the recurrent weights (per channel)"}}
    meta = meta.model_copy(update=update)
    ModelPackage.model_validate(meta.model_dump())  # the copy bypasses validation
    (directory / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
    (directory / CARD_FILE).write_text(card)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / TOKENIZER_DIR, symlinks=False)
    write_manifest(directory)
    return meta


def read_package(directory: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> ModelPackage:
    """Parse ``klinebus.json`` (no hash check; use ``verify_package`` before loading the model)."""
    path = f"{str(directory).rstrip('/')}/{META_FILE}"
    try:
        text = _read_bytes(path, fs, MAX_MANIFEST_BYTES * 16).decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise PackageError(f"{directory}: no {META_FILE}") from None
    return parse_meta(text, str(directory))


def _present_files(base: str, fs: fsspec.AbstractFileSystem | None) -> list[str]:
    if fs is None:
        return _local_files(Path(base))
    root = fs._strip_protocol(base).rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p.startswith(root + "/"))


def verify_package(
    directory: str | Path,
    expected_sha256: str | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
    check_graph: bool = True,
) -> ModelPackage:
    """Check a package before it is used; raises ``PackageError`` with one line saying what is wrong.

    Checks: the manifest's sha256 equals ``expected_sha256`` (the digest announced on ``models.v1``);
    the package holds exactly the files the manifest lists (no more, no symbolic links, no name
    leaving the folder) with the sizes and sha256 it records; ``klinebus.json`` parses and its
    ``sha256`` is that of ``model.onnx``; the card exists; and, where the ``onnx`` package is installed
    and the package is local, the graph's input and output names are those recorded.
    """
    base = str(directory).rstrip("/")
    files, digest = read_manifest(directory, fs)
    if expected_sha256 is not None and digest != expected_sha256:
        raise PackageError(f"{directory}: package digest ({MANIFEST_FILE} sha256) {digest[:12]}… differs from "
                           f"the announced {expected_sha256[:12]}…")
    for required in (META_FILE, MODEL_FILE, CARD_FILE):
        if required not in files:
            raise PackageError(f"{directory}: {MANIFEST_FILE} does not list {required}")
    present = [p for p in _present_files(base, fs) if p != MANIFEST_FILE and p not in IGNORED]
    extra = sorted(set(present) - set(files))
    if extra:
        raise PackageError(f"{directory}: {extra[0]} is not in {MANIFEST_FILE}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(set(files) - set(present))
    if missing:
        raise PackageError(f"{directory}: no {missing[0]} (listed in {MANIFEST_FILE})")
    for rel in sorted(files):
        path = f"{base}/{rel}"
        if fs is None:
            inside(base, rel)
        actual = sha256_file(path, fs)
        if actual != files[rel]["sha256"]:
            raise PackageError(f"{directory}: {rel} sha256 {actual[:12]}… differs from {MANIFEST_FILE}'s "
                               f"{files[rel]['sha256'][:12]}… (changed after it was packaged)")
    meta = read_package(directory, fs)
    if meta.sha256 != files[MODEL_FILE]["sha256"]:
        raise PackageError(f"{directory}: {MODEL_FILE} sha256 {files[MODEL_FILE]['sha256'][:12]}… differs from "
                           f"{META_FILE}'s {meta.sha256[:12]}…")
    graphs = [MODEL_FILE]
    fast = meta.config.get("fast_model")
    if fast is not None or FAST_MODEL_FILE in files:
        # The fast variant is served instead of model.onnx: klinebus.json names it with its hash,
        # and it is checked like model.onnx.
        if not isinstance(fast, dict) or fast.get("file") != FAST_MODEL_FILE or FAST_MODEL_FILE not in files \
                or fast.get("sha256") != files[FAST_MODEL_FILE]["sha256"]:
            raise PackageError(f"{directory}: {FAST_MODEL_FILE} and {META_FILE}'s config.fast_model do not match "
                               f"(both or neither, with the manifest's sha256)")
        graphs.append(FAST_MODEL_FILE)
    if check_graph and fs is None:
        try:
            import onnx
        except ImportError:
            return meta
        for name in graphs:
            _check_graph(onnx, directory, base, name, meta)
    return meta


def _check_graph(onnx: Any, directory: str | Path, base: str, name: str, meta: ModelPackage) -> None:
    try:
        graph = onnx.load(f"{base}/{name}", load_external_data=False).graph
    except Exception as e:  # a truncated or foreign file
        raise PackageError(f"{directory}: {name} is not a readable ONNX model ({type(e).__name__})") from None
    initializers = {i.name for i in graph.initializer}
    ins = [i.name for i in graph.input if i.name not in initializers]
    outs = [o.name for o in graph.output]
    if ins != [t.name for t in meta.inputs] or outs != [t.name for t in meta.outputs]:
        raise PackageError(f"{directory}: {name} graph inputs {ins} / outputs {outs} differ from {META_FILE}'s")
    if any(i.HasField("data_location") and i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer):
        raise PackageError(f"{directory}: {name} keeps weights outside the file")
