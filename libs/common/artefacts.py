"""Bounded artefact reads: a chart PNG is read only from the configured artefact root, capped in size
and checked to be a PNG before anyone uses it.

Every reader of a chart's ``uri`` (vlm, alerts, inference's chart classifiers) goes through
``ArtefactRoot.read_png``: a uri on ``charts.v1`` is input like any other, and without this an event
naming ``file:///proc/self/environ`` posts the service's secrets to the alert channel, an
``http://169.254.169.254/...`` uri makes the service fetch cloud credentials (SSRF), and
``file:///dev/zero`` exhausts its memory. What is refused, and why (``ArtefactRefused.kind``, a
bounded metric label):

- ``outside_root``: another scheme or host than the root's, ``..``, or a local path that (after
  symbolic links) is not under the root;
- ``not_a_file``: a device, FIFO or folder under the root (never opened);
- ``too_large``: more than ``max_bytes`` (only ``max_bytes + 1`` bytes are ever read);
- ``not_png``: the bytes do not start with the PNG signature;
- ``unreadable``: missing, expired by retention, or the store failed.

The file is opened through the root's own filesystem (made from the configured URL), never through
``fsspec.open(uri)``, so a uri cannot bring its own protocol or storage options.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Any

import fsspec
from fsspec.core import split_protocol

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # a 1000x750 analysis chart is ~100 KB
_LOCAL = ("file", "local")

OUTSIDE_ROOT = "outside_root"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"
NOT_PNG = "not_png"
UNREADABLE = "unreadable"


class ArtefactRefused(ValueError):
    """A chart uri that is not read (or whose bytes are not used); ``kind`` is a metric label, the
    message one line."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _norm(path: str) -> str:
    """A remote path as ``/bucket/key``, whatever slashes the URL had (``memory://x``, ``memory:///x``)."""
    return posixpath.normpath("/" + path.lstrip("/")).rstrip("/") or "/"


def _shown(uri: str) -> str:
    return uri if len(uri) <= 200 else uri[:200] + "…"


class ArtefactRoot:
    """The configured artefact root (a folder or an fsspec URL) and the one way to read from it."""

    def __init__(self, url: str, max_bytes: int = DEFAULT_MAX_BYTES, metrics: Any = None) -> None:
        self.url = str(url)
        # Parsed now, its filesystem made at the first remote read: a service that never reads a chart
        # starts without the object store's client library (s3fs, gcsfs) installed.
        proto, root = split_protocol(self.url)
        self.protocol = proto or "file"
        self.local = self.protocol in _LOCAL
        self._fs: fsspec.AbstractFileSystem | None = None
        self.root = os.path.realpath(root) if self.local else _norm(root)
        self.max_bytes = max_bytes
        self.refused = (metrics.counter("artefact_reads_refused_total", "Chart artefact reads refused, by kind", ["kind"])
                        if metrics is not None else None)

    def path_of(self, uri: str) -> str:
        """The path under the root that ``uri`` names; ``ArtefactRefused(outside_root)`` otherwise."""
        if not isinstance(uri, str) or not uri or "\x00" in uri:
            raise ArtefactRefused(OUTSIDE_ROOT, "chart uri is empty or not text")
        proto, path = split_protocol(uri)
        proto = proto or "file"
        if (proto in _LOCAL) != self.local or (not self.local and proto != self.protocol):
            raise ArtefactRefused(OUTSIDE_ROOT, f"{_shown(uri)} is not under the artefact root {self.url}")
        if self.local:
            real = os.path.realpath(path)
            if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
                raise ArtefactRefused(OUTSIDE_ROOT, f"{_shown(uri)} is not under the artefact root {self.url}")
            return real
        if ".." in path.split("/"):
            raise ArtefactRefused(OUTSIDE_ROOT, f"{_shown(uri)} climbs out with '..'")
        norm = _norm(path)
        if not norm.startswith(self.root.rstrip("/") + "/"):
            raise ArtefactRefused(OUTSIDE_ROOT, f"{_shown(uri)} is not under the artefact root {self.url}")
        return norm

    def read_png(self, uri: str) -> bytes:
        """The PNG's bytes; ``ArtefactRefused`` (counted) when the uri or the bytes are refused."""
        try:
            return self._read_png(uri)
        except ArtefactRefused as exc:
            if self.refused is not None:
                self.refused.labels(exc.kind).inc()
            raise

    def _read_png(self, uri: str) -> bytes:
        path = self.path_of(uri)
        try:
            if self.local:
                # O_NONBLOCK: a FIFO planted under the root cannot hang the open; only regular files are read
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise ArtefactRefused(NOT_A_FILE, f"{_shown(uri)} is not a regular file")
                    with os.fdopen(fd, "rb", closefd=False) as fh:
                        data = fh.read(self.max_bytes + 1)
                finally:
                    os.close(fd)
            else:
                if self._fs is None:
                    self._fs = fsspec.core.url_to_fs(self.url)[0]
                with self._fs.open(self._fs._strip_protocol(f"{self.protocol}://{path.lstrip('/')}"), "rb") as fh:
                    data = fh.read(self.max_bytes + 1)
        except ArtefactRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend's error: the chart is refused, the service goes on
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            raise ArtefactRefused(UNREADABLE, f"cannot read {_shown(uri)}: {type(exc).__name__}: {first}") from None
        if len(data) > self.max_bytes:
            raise ArtefactRefused(TOO_LARGE, f"{_shown(uri)} is larger than {self.max_bytes} bytes")
        if not data.startswith(PNG_SIGNATURE):
            raise ArtefactRefused(NOT_PNG, f"{_shown(uri)} is not a PNG (no PNG signature)")
        return data
