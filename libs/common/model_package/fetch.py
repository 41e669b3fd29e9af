"""Bringing an announced package to a local folder: only from allowed sources, verified first.

A ``models.v1`` event names a uri: a local path, an fsspec URL or ``hf://<repo_id>@<revision>``.
``Sources`` says which of those a service loads from (its registry roots and Hub organisations);
anything else is refused before a byte is read, so an announcement cannot point inference at
``/etc``, another team's bucket or somebody's Hub repository.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.core import split_protocol

from libs.common.model_package.files import verify_package
from libs.common.model_package.schema import _SHA256, HF_SCHEME, ModelPackage, PackageError

_LOCAL = ("file", "local")


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


@dataclass(frozen=True)
class Sources:
    """Where packages may come from, and where remote ones are cached.

    ``roots``: local folders, fsspec URLs (``s3://bucket/models``) and Hub owners (``hf://my-org``)
    or repositories (``hf://my-org/bilstm-ohlc-BTCUSDT-15m``). A uri is allowed when it is one of
    them or lies under one; ``..`` and symbolic links out of a local root do not count as under it.
    """

    cache_dir: Path
    roots: tuple[str, ...] = field(default_factory=tuple)

    def check(self, uri: str) -> None:
        if not any(_under(uri, root) for root in self.roots):
            shown = ", ".join(self.roots) or "(none)"
            raise PackageError(f"{uri[:200]}: not under a configured model source ({shown})")


def _under(uri: str, root: str) -> bool:
    if uri.startswith(HF_SCHEME) or root.startswith(HF_SCHEME):
        if not (uri.startswith(HF_SCHEME) and root.startswith(HF_SCHEME)):
            return False
        repo = uri[len(HF_SCHEME):].partition("@")[0].strip("/")
        allowed = root[len(HF_SCHEME):].strip("/")
        return bool(allowed) and ".." not in repo.split("/") and (repo == allowed or repo.startswith(allowed + "/"))
    # Parsed, not opened: no filesystem (nor its network client) is made for a uri that is refused.
    up, upath = split_protocol(uri)
    rp, rpath = split_protocol(root)
    up, rp = up or "file", rp or "file"
    if (up in _LOCAL) != (rp in _LOCAL) or (up not in _LOCAL and up != rp):
        return False
    if up in _LOCAL:
        base, target = Path(rpath).resolve(), Path(upath).resolve()
        return target == base or base in target.parents
    if ".." in upath.split("/"):
        return False
    upath, rpath = posixpath.normpath(upath), posixpath.normpath(rpath).rstrip("/")
    return upath == rpath or upath.startswith(rpath + "/")


def fetch_package(
    uri: str,
    expected_sha256: str,
    cache_dir: str | Path | Sources,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, ModelPackage]:
    """Bring an announced package to a local folder and verify it against the announced digest.

    ``uri`` is a local path, an fsspec URL or ``hf://<repo_id>@<revision>``; with ``Sources`` it must
    lie under one of its roots. Remote packages are downloaded beside ``cache_dir/<digest>``, verified
    there and only then renamed to it, so the cache never holds a copy that does not match its name;
    a cached copy is re-verified, not trusted.
    """
    if isinstance(cache_dir, Sources):
        cache_dir.check(uri)
        cache_dir = cache_dir.cache_dir
    if not isinstance(expected_sha256, str) or not _SHA256.match(expected_sha256):
        raise PackageError(f"{uri[:200]}: the announced digest is not 64 lower-case hex digits")
    if not uri.startswith(HF_SCHEME):
        fs, path = fsspec.core.url_to_fs(uri)
        if _protocol(fs) in _LOCAL:
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
