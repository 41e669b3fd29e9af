"""The Parquet klines archive: append-only, immutable part files, de-duplicated on read.

Layout, under ``root`` (a local folder or any fsspec URL: s3://, gs://, memory://, ...)::

    <SYMBOL>/<interval>/<YYYY-MM>.<seq>.<token>.parquet   a part: rows of one UTC month (of open_time)
    <SYMBOL>/<interval>/<YYYY-MM>.parquet                 a month file of earlier versions (read as a part)

**No writer ever rewrites or replaces a file.** A write adds a new part under a name no other
writer can choose (``seq``: microseconds since the epoch at write time, ``token``: random), so
the archiver's live loop, its reclaimer, a second archiver replica and ``klinebus history
import`` can all write the same month at the same moment and every row survives. Earlier
versions read the month file, merged and rewrote it: two writers racing lost whichever rows the
other had added (last writer wins).

**Reads de-duplicate** by (symbol, interval, open_time): a re-delivered or re-imported candle may
sit in two parts; the one in the newest part (highest ``seq``) is returned, once.

**Compaction** merges a month's parts into one new part and then deletes exactly the parts it
read. It never deletes a row that is not already in a newer file, so compactions may race each
other, writers and readers without a lock: a reader that finds a part gone mid-read lists the
month again. Writers compact a month once it holds more than ``compact_after`` parts, so reads
stay a file or a few per month (as fast as the single month file was; ``bench/bench_archive.py``
measures it); ``compact_all`` (``klinebus history compact``) does every month.

Errors: ``ArchiveReadError`` says whether a failure is permanent (access denied, a missing
bucket, a corrupt file: retrying cannot help) or transient (network, throttling, a 5xx), see
``is_permanent``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import errno
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from libs.common.klines import Kline, klines_to_frame

log = logging.getLogger("klinebus.archive")

COLUMNS = list(Kline.__dataclass_fields__)
SCHEMA = pa.schema(
    [
        ("symbol", pa.string()), ("interval", pa.string()), ("open_time", pa.int64()), ("close_time", pa.int64()),
        ("open", pa.float64()), ("high", pa.float64()), ("low", pa.float64()), ("close", pa.float64()),
        ("volume", pa.float64()), ("quote_volume", pa.float64()), ("trades", pa.int64()),
        ("taker_buy_base", pa.float64()), ("taker_buy_quote", pa.float64()), ("closed", pa.bool_()),
    ]
)  # fmt: skip
assert SCHEMA.names == COLUMNS, "SCHEMA must list the Kline fields in order"

# A month with more parts than this is compacted by the writer that added the last one. A live
# 1m stream adds about one part per archiver batch (a minute); at 8 a month is re-merged every
# 8 minutes or so per stream, and a read opens at most 9 files per month, which reads about as
# fast as the single month file did (bench/bench_archive.py: 0.9x at worst, 1.8x compacted).
COMPACT_AFTER_PARTS = 8
# A reader that finds a part deleted under it (a compaction finished meanwhile) lists again.
READ_ATTEMPTS = 5
# Parts read in parallel from an object store (one request each).
READ_THREADS = 8
# Object stores whose PUT makes an object visible only once complete: parts are written in place.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
# A local temp file older than this is a writer's leftover (killed mid-write): compaction removes it.
STALE_TMP_S = 3600.0
# Open-time sets of parts remembered per archive (parts never change, so they never go stale).
SEEN_CACHE_FILES = 4096

_PART = re.compile(r"^(\d{4}-\d{2})(?:\.(\d{1,20})\.([0-9a-zA-Z]{1,40}))?\.parquet$")


def month_of(open_time_ms: int) -> str:
    return dt.datetime.fromtimestamp(open_time_ms / 1000, dt.timezone.utc).strftime("%Y-%m")


@dataclass(frozen=True, order=True)
class Part:
    """One immutable file of a month; sorts oldest first (``seq``, then ``token``)."""

    month: str
    seq: int
    token: str
    path: str


# --- errors --------------------------------------------------------------------------------

# HTTP statuses a retry can get past: timeouts, throttling, server trouble.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Error codes of object stores (S3, GCS, Azure) that no retry fixes.
_PERMANENT_CODES = {
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "NoSuchBucket", "InvalidBucketName", "ExpiredToken", "InvalidToken", "AuthorizationFailure",
    "AuthenticationFailed", "Forbidden", "403", "401", "404",
}  # fmt: skip
_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "ServerBusy", "OperationTimedOut", "500", "502", "503", "504",
}  # fmt: skip
_PERMANENT_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _code_of(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        if code is not None:
            return str(code)
    return None


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying an archive operation that raised ``exc`` is pointless.

    Permanent: access denied (403, ``PermissionError``, a read-only or missing folder), a missing
    bucket, bad credentials, a file that is not valid Parquet, a programming error. Transient:
    connection and timeout errors, throttling (429, ``SlowDown``), 5xx answers, anything else the
    network or the store may get over. Follows ``__cause__`` chains (s3fs and gcsfs wrap the
    client's error in an ``OSError``)."""
    if isinstance(exc, ArchiveReadError):
        return exc.permanent
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = _code_of(e)
        if code in _PERMANENT_CODES:
            return True
        if code in _TRANSIENT_CODES:
            return False
        status = _status_of(e)
        if status is not None:
            return status not in _TRANSIENT_HTTP and 400 <= status < 500
        if isinstance(e, (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)):
            return True  # not Parquet, or not the archive's columns: the same bytes fail again
        if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError)):
            return True
        if isinstance(e, (TimeoutError, ConnectionError)):
            return False
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno in _PERMANENT_ERRNO
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError):
        return False  # a network or store error without a code: worth another try
    return not _looks_like_network(exc)


def _looks_like_network(exc: BaseException) -> bool:
    """aiohttp/botocore/google errors that are not OSErrors but are network trouble."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ClientConnectionError", "ServerDisconnectedError", "EndpointConnectionError",
                         "ConnectTimeoutError", "ReadTimeoutError", "TransportError", "ServiceUnavailable",
                         "TooManyRequests", "ClientPayloadError"})


class ArchiveReadError(OSError):
    """A read of the archive failed. ``permanent``: retrying cannot help (fix access, the bucket
    or the file); otherwise wait and try again. An ``OSError`` so callers that already wait out
    I/O errors keep doing so."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


# --- the archive -----------------------------------------------------------------------------


class ParquetArchive:
    def __init__(self, root: str, *, compact_after: int = COMPACT_AFTER_PARTS) -> None:
        if compact_after < 1:
            raise ValueError(f"compact_after must be >= 1 part, got {compact_after}")
        self.url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.root = self.root.rstrip("/")
        self.compact_after = compact_after
        self._local = "file" in _protocols(self.fs)
        self._atomic_put = bool(set(_protocols(self.fs)) & ATOMIC_PUT_PROTOCOLS)
        # open_times of each part this archive has read (parts are immutable)
        self._seen: OrderedDict[str, np.ndarray] = OrderedDict()
        self._seen_lock = threading.Lock()  # the archiver writes from worker threads

    # --- naming ------------------------------------------------------------------------------

    def folder(self, symbol: str, interval: str) -> str:
        return f"{self.root}/{symbol}/{interval}"

    def path(self, symbol: str, interval: str, month: str) -> str:
        """The single month file of earlier versions (still read). New rows go to parts:
        ``files`` lists what a month holds now."""
        return f"{self.folder(symbol, interval)}/{month}.parquet"

    def parts(self, symbol: str, interval: str) -> dict[str, list[Part]]:
        """Every part of a stream, by month, oldest first."""
        folder = self.folder(symbol, interval)
        self.fs.invalidate_cache(folder)  # object-store clients cache listings; parts come and go
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise _read_error(f"listing {folder}", exc) from exc
        out: dict[str, list[Part]] = {}
        for p in names:
            m = _PART.match(p.rsplit("/", 1)[-1])
            if m is None:
                continue
            month, seq, token = m.group(1), int(m.group(2) or 0), m.group(3) or ""
            out.setdefault(month, []).append(Part(month, seq, token, p))
        for ps in out.values():
            ps.sort()
        return dict(sorted(out.items()))

    def months(self, symbol: str, interval: str) -> list[str]:
        return list(self.parts(symbol, interval))

    def files(self, symbol: str, interval: str, months: Sequence[str] | None = None) -> list[str]:
        """Paths of the parts holding a stream's rows now (for checksums and provenance)."""
        return [p.path for m, ps in self.parts(symbol, interval).items() if months is None or m in months for p in ps]

    # --- writing -----------------------------------------------------------------------------

    def write(self, klines: Iterable[Kline]) -> int:
        """Add closed candles; returns how many were not in the archive yet (as this writer sees
        it). Each month touched gets one new part holding its new candles, nothing is rewritten;
        a month past ``compact_after`` parts is then compacted."""
        groups: dict[tuple[str, str, str], list[Kline]] = {}
        for k in klines:
            groups.setdefault((k.symbol, k.interval, month_of(k.open_time)), []).append(k)
        added = 0
        for (symbol, interval), months in _by_stream(groups).items():
            listing = self.parts(symbol, interval)
            for month, ks in months.items():
                given: dict[int, Kline] = {k.open_time: k for k in ks}  # a candle given twice: the last copy
                times = np.fromiter(given, dtype=np.int64, count=len(given))
                fresh = times[~np.isin(times, self._open_times(listing.get(month, [])))]
                if not len(fresh):
                    continue
                new = {int(t): given[int(t)] for t in fresh}
                part = self._write_part(symbol, interval, month, klines_to_frame(new.values()))
                added += len(new)
                if len(listing.get(month, [])) + 1 > self.compact_after:
                    self._compact_parts(symbol, interval, month, [*listing.get(month, []), part])
        return added

    def _write_part(self, symbol: str, interval: str, month: str, frame: pd.DataFrame, seq: int | None = None,
                    token: str | None = None) -> Part:
        table = _to_table(frame.assign(closed=True)).sort_by("open_time")
        seq = time.time_ns() // 1000 if seq is None else seq
        token = token or uuid.uuid4().hex[:16]
        path = f"{self.folder(symbol, interval)}/{month}.{seq:020d}.{token}.parquet"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self._atomic_put:
            with self.fs.open(path, "wb") as fh:  # an object store PUT is all or nothing
                pq.write_table(table, fh, compression="zstd")
        else:
            # Written beside its name, then renamed (atomic on one disk), so a reader never sees
            # half a part; other filesystems show a file while it is written (fsspec's memory://).
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
            self.fs.mv(tmp, path)
        self._remember(path, table.column("open_time").to_numpy())
        return Part(month, seq, token, path)

    # --- compaction --------------------------------------------------------------------------

    def compact(self, symbol: str, interval: str, month: str) -> int:
        """Merge a month's parts into one; returns how many parts were merged (0: nothing to do)."""
        return self._compact_parts(symbol, interval, month, self.parts(symbol, interval).get(month, []))

    def compact_all(self, min_parts: int = 2) -> dict[tuple[str, str, str], int]:
        """Compact every month with at least ``min_parts`` parts; {(symbol, interval, month): merged}."""
        out: dict[tuple[str, str, str], int] = {}
        for symbol, interval in self.streams():
            for month, ps in self.parts(symbol, interval).items():
                if len(ps) >= min_parts:
                    out[(symbol, interval, month)] = self._compact_parts(symbol, interval, month, ps)
        return out

    def streams(self) -> list[tuple[str, str]]:
        """Every (symbol, interval) with a folder in the archive."""
        out = []
        if not self.fs.exists(self.root):
            return out
        for sym_dir in self.fs.ls(self.root, detail=False):
            symbol = sym_dir.rstrip("/").rsplit("/", 1)[-1]
            if symbol.startswith(("_", ".")) or not self.fs.isdir(sym_dir):
                continue
            for int_dir in self.fs.ls(sym_dir, detail=False):
                if self.fs.isdir(int_dir):
                    out.append((symbol, int_dir.rstrip("/").rsplit("/", 1)[-1]))
        return sorted(out)

    def _compact_parts(self, symbol: str, interval: str, month: str, parts: list[Part]) -> int:
        if len(parts) < 2:
            return 0
        try:
            table = self._read_parts(parts)
        except FileNotFoundError:
            return 0  # another compaction took some of them first: its output holds their rows
        # The merged part sorts where the newest of its inputs did, so precedence is unchanged.
        newest = max(parts)
        self._write_part(symbol, interval, month, table.to_pandas(), seq=newest.seq, token=f"c{uuid.uuid4().hex[:15]}")
        # Only now, with every row safe in the new part, the inputs go.
        for p in parts:
            try:
                self.fs.rm(p.path)
            except FileNotFoundError:
                pass  # a racing compaction removed it (after writing its own copy of the rows)
            with self._seen_lock:
                self._seen.pop(p.path, None)
        log.debug("compacted %s %s %s: %d parts -> 1 (%d rows)", symbol, interval, month, len(parts), table.num_rows)
        if self._local:
            self._remove_stale_tmp(self.folder(symbol, interval))
        return len(parts)

    def _remove_stale_tmp(self, folder: str) -> None:
        """Temp files of writers killed mid-write (never read; a live writer's are younger)."""
        cutoff = time.time() - STALE_TMP_S
        for info in self.fs.ls(folder, detail=True):
            name = info["name"]
            if ".parquet.tmp-" in name.rsplit("/", 1)[-1] and float(info.get("mtime", cutoff)) < cutoff:
                try:
                    self.fs.rm(name)
                except FileNotFoundError:
                    pass

    # --- reading -----------------------------------------------------------------------------

    def read(self, symbol: str, interval: str, start: int | None = None, end: int | None = None) -> pd.DataFrame:
        """Candles with ``start <= open_time <= end`` (ms; None: unbounded), sorted, one row per
        open_time, Kline columns. Raises ``ArchiveReadError`` (see ``is_permanent``)."""
        lo = month_of(start) if start is not None else ""
        hi = month_of(end) if end is not None else "9999-99"
        for attempt in range(READ_ATTEMPTS):
            parts = [p for m, ps in self.parts(symbol, interval).items() if lo <= m <= hi for p in ps]
            if not parts:
                return _empty_frame()
            try:
                table = self._read_parts(parts, start, end)
            except FileNotFoundError:
                if attempt + 1 == READ_ATTEMPTS:
                    raise ArchiveReadError(
                        f"{self.folder(symbol, interval)}: parts kept vanishing while read ({READ_ATTEMPTS} tries)",
                        permanent=False,
                    ) from None
                continue  # a compaction replaced some parts: list again
            except ArchiveReadError:
                raise
            except Exception as exc:
                raise _read_error(f"reading {self.folder(symbol, interval)}", exc) from exc
            return table.to_pandas()
        raise AssertionError("unreachable")

    def _read_parts(self, parts: list[Part], start: int | None = None, end: int | None = None) -> pa.Table:
        """The rows of ``parts`` (oldest first) within [start, end], one per open_time (the
        newest part's copy), sorted by open_time."""
        columns: list[str] | None = None

        def one(p: Part) -> pa.Table:
            # ParquetFile.read: about half the per-file cost of read_table (no dataset set-up)
            if self._local:  # pyarrow's own file reads, without a Python file object in between
                return _conform(pq.ParquetFile(p.path).read(columns=columns, use_threads=False))
            with self.fs.open(p.path, "rb") as fh:
                return _conform(pq.ParquetFile(fh).read(columns=columns, use_threads=False))

        if len(parts) == 1 or self._local:
            tables = [one(p) for p in parts]  # local reads are CPU-bound: threads only add contention
        else:  # object stores: one request per part, in parallel
            with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(parts))) as pool:
                tables = list(pool.map(one, parts))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        ot = table.column("open_time").to_numpy()
        if start is not None or end is not None:
            keep = np.ones(len(ot), dtype=bool)
            if start is not None:
                keep &= ot >= start
            if end is not None:
                keep &= ot <= end
            if not keep.all():
                table = table.filter(pa.array(keep))
                ot = ot[keep]
        if len(ot) > 1 and not (np.diff(ot) > 0).all():
            # Overlapping parts: keep the last copy of each open_time (parts are concatenated
            # oldest first, so that is the newest part's), then sort.
            order = np.lexsort((np.arange(len(ot)), ot))
            sorted_ot = ot[order]
            last = np.ones(len(order), dtype=bool)
            last[:-1] = sorted_ot[1:] != sorted_ot[:-1]
            table = table.take(pa.array(order[last]))
        return table

    def _open_times(self, parts: list[Part]) -> np.ndarray:
        """The open_times held by ``parts`` (read once per part, then remembered)."""
        with self._seen_lock:
            missing = [p for p in parts if p.path not in self._seen]
        for p in missing:
            try:
                with self.fs.open(p.path, "rb") as fh:
                    ot = pq.read_table(fh, columns=["open_time"]).column("open_time").to_numpy()
            except FileNotFoundError:
                continue  # compacted away meanwhile: its rows are in the part that replaced it
            self._remember(p.path, ot)
        held = []
        with self._seen_lock:
            for p in parts:
                ot = self._seen.get(p.path)
                if ot is not None:
                    self._seen.move_to_end(p.path)
                    held.append(ot)
        return np.concatenate(held) if held else np.empty(0, dtype=np.int64)

    def _remember(self, path: str, open_times: np.ndarray) -> None:
        with self._seen_lock:
            self._seen[path] = open_times
            while len(self._seen) > SEEN_CACHE_FILES:
                self._seen.popitem(last=False)


def _by_stream(groups: dict[tuple[str, str, str], list[Kline]]) -> dict[tuple[str, str], dict[str, list[Kline]]]:
    out: dict[tuple[str, str], dict[str, list[Kline]]] = {}
    for (symbol, interval, month), ks in groups.items():
        out.setdefault((symbol, interval), {})[month] = ks
    return out


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _to_table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame[COLUMNS], schema=SCHEMA, preserve_index=False)


def _conform(table: pa.Table) -> pa.Table:
    """A part's table in the archive's schema (files from earlier versions, or rewritten by a
    person with pandas, may differ in column order, metadata or integer width)."""
    if table.schema.equals(SCHEMA, check_metadata=False):
        return table.replace_schema_metadata(None)
    missing = [n for n in ("open_time", "open", "high", "low", "close", "volume") if n not in table.column_names]
    if missing:
        raise pa.ArrowInvalid(f"archive part lacks kline columns {missing}")
    arrays = []
    for f in SCHEMA:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type).fill_null(True if f.name == "closed" else 0))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _read_error(what: str, exc: BaseException) -> ArchiveReadError:
    permanent = is_permanent(exc)
    kind = "permanent" if permanent else "transient"
    return ArchiveReadError(f"archive {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} ({kind})",
                            permanent=permanent)


def _empty_frame() -> pd.DataFrame:
    # Built once, handed out as copies: pyarrow's conversion costs ~0.5 ms (~2 ms on a busy
    # machine) and features asks once per new key at its warm-up, so a first deployment of 4,000
    # symbols spent ~7 s of its first burst here; a copy costs ~16 us.
    global _EMPTY
    if _EMPTY is None:
        _EMPTY = SCHEMA.empty_table().to_pandas()
    return _EMPTY.copy()


_EMPTY: pd.DataFrame | None = None


def read_archive(root: str, symbol: str, interval: str, start: int | None = None, end: int | None = None) -> pd.DataFrame:
    """What the features and trainer services call: the archived candles of one stream.
    Raises ``ArchiveReadError``; ``is_permanent(exc)`` tells whether to retry."""
    return ParquetArchive(root).read(symbol.upper(), interval, start, end)
