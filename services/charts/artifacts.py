"""Where chart PNGs go: any fsspec URL (a local folder by default), written atomically, expired by age.

Reading goes through ``libs.common.artefacts.ArtefactRoot`` (the one bounded reader every service
uses: under this root only, a size cap, PNG only). Object names carry their render time, so expiry reads names, not file-system
metadata that differs between backends (local mtime, S3 LastModified, ...).
"""

from __future__ import annotations

import re
import uuid

import fsspec

from libs.common.artefacts import DEFAULT_MAX_BYTES, ArtefactRoot

NAME_RE = re.compile(r"-(?P<rendered_at>\d{13})\.png$")


class ArtifactStore:
    def __init__(self, url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.reader = ArtefactRoot(self.url, max_bytes)

    def name_for(self, symbol: str, interval: str, preset: str, last_open_time: int, rendered_at: int) -> str:
        return f"{symbol}/{interval}/{preset}/{symbol}-{interval}-{preset}-{last_open_time}-{rendered_at}.png"

    def put(self, name: str, data: bytes) -> str:
        """Write ``data`` under ``name``; readers never see a half-written file. Returns the URI."""
        path = f"{self.root}/{name}"
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        # a rename within one folder is atomic on local disks; object stores publish whole objects
        self.fs.mv(tmp, path)
        return self.uri(name)

    def delete(self, name: str) -> None:
        """Remove one chart (rendered, then refused by the once-per-candle guard)."""
        try:
            self.fs.rm(f"{self.root}/{name}")
        except FileNotFoundError:
            pass

    def uri(self, name: str) -> str:
        return self.fs.unstrip_protocol(f"{self.root}/{name}")

    def get(self, uri_or_name: str) -> bytes:
        """A chart's PNG by uri or name; ``ArtefactRefused`` outside the root, too large or not a PNG."""
        uri = uri_or_name if "://" in uri_or_name or uri_or_name.startswith("/") else self.uri(uri_or_name)
        return self.reader.read_png(uri)

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        prefix = len(self.root) + 1
        return sorted(p[prefix:] for p in self.fs.find(self.root) if p.endswith(".png"))

    def expire(self, retention_s: float, now_ms: int) -> int:
        """Delete charts rendered more than ``retention_s`` ago; returns how many."""
        cutoff = now_ms - int(retention_s * 1000)
        old = [n for n in self.names() if (m := NAME_RE.search(n)) and int(m["rendered_at"]) < cutoff]
        for name in old:
            self.fs.rm(f"{self.root}/{name}")
        return len(old)
