"""The registry: ``<root>/<model-name>/<version>/`` on a local folder or any fsspec URL.

Versions are positive integers written as decimal strings (``"1"``, ``"2"``, ...); they only grow.
Publishing writes the package under a hidden staging name, verifies it there and only then moves it
to its version, so a reader (or a crash) never sees half a package. On object stores the move is a
copy followed by a delete; readers still only look at version folders that hold a ``klinebus.json``,
and inference verifies every file against the manifest before it loads one.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from libs.common.model_package.files import manifest_bytes, read_manifest, verify_package, read_package, digest_of
from libs.common.model_package.schema import MANIFEST_FILE, META_FILE, STAGING_PREFIX, ModelPackage, PackageError


@dataclass(frozen=True)
class PublishedPackage:
    name: str
    version: str
    uri: str
    sha256: str  # the package digest (sha256 of klinebus.manifest.json), what models.v1 announces
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
        files, _ = read_manifest(staged)
        self.fs.makedirs(self.path(meta.name), exist_ok=True)
        local = self._protocol in ("file", "local")
        for _attempt in range(20):
            version = self.next_version(meta.name)
            final_meta = meta.model_copy(update={"version": version})
            meta_text = (final_meta.model_dump_json(indent=2) + "\n").encode()
            # the manifest follows the rewritten klinebus.json (same bytes when the version is unchanged)
            manifest = manifest_bytes({**files, META_FILE: {"sha256": hashlib.sha256(meta_text).hexdigest(),
                                                              "size": len(meta_text)}})
            digest = digest_of(manifest)
            tmp = self.path(meta.name, f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
            self.fs.makedirs(tmp, exist_ok=False)
            try:
                for item in sorted(staged.rglob("*")):
                    rel = item.relative_to(staged).as_posix()
                    if item.is_dir():
                        self.fs.makedirs(f"{tmp}/{rel}", exist_ok=True)
                    elif rel in (META_FILE, MANIFEST_FILE):
                        with self.fs.open(f"{tmp}/{rel}", "wb") as f:
                            f.write(meta_text if rel == META_FILE else manifest)
                    else:
                        self.fs.put_file(str(item), f"{tmp}/{rel}")
                verify_package(tmp, digest, None if local else self.fs)
                dest = self.path(meta.name, version)
                if self.fs.exists(dest):  # another publisher took this version meanwhile
                    self.fs.rm(tmp, recursive=True)
                    continue
                self.fs.mv(tmp, dest, recursive=True)
            except BaseException:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
                raise
            return PublishedPackage(meta.name, version, self.uri(meta.name, version), digest, final_meta)
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
