"""The advice preference dataset (seed 003) from Binance 1m candles.

For each target minute ``n`` (a candle whose ``lookback + 1`` predecessors are all present, no
gap):

* ``context``: the previous ``lookback`` minutes (``n-lookback .. n-1``) as the seed's three
  lists of strings with 8 decimals: ``open_changes`` (each minute's open minus the minute
  before's open, in quote currency, as the seed's BNBBTC examples show), ``prev_volumes`` (base
  volume) and ``prev_trade_counts`` (left out, never zero-filled, when the source has none);
* ``accepted``: the answer we want, ``{"predicted_open_change": open[n] - open[n-1],
  "advice": label(n)}``;
* ``rejected``: the seed's negative, a different advice drawn by a generator seeded with
  ``(seed, symbol, open_time)`` (so a minute's draw does not depend on which ranges were asked
  for) and, as the seed describes it, "a predicted open price change based on the previous data
  point": minute ``n-1``'s own open change.

``label(n)`` (see ``advice_for``): BUY when candle ``n`` rose at least ``threshold`` above its
open and never fell ``threshold`` below it, SELL the mirror image, NOOP otherwise (a quiet minute,
or a whipsaw that crossed both lines, where the order of the moves inside the candle is unknown).

A minute belongs to a split only if every candle it reads (``n-lookback-1 .. n``) opens inside
that split's half-open range, so training and verification never share a candle; verification
must lie after training (a later time slice, as every model here is judged).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from libs.common.archive import ParquetArchive, read_archive
from libs.common.errors import CliError
from libs.common.klines import INTERVAL_MS, InvalidKline, infer_symbol_interval, read_kline_frame
from services.trainer.advice import prompt as P

KIND = "advice"
DATASET_VERSION = 1
INTERVAL = "1m"
MINUTE_MS = INTERVAL_MS[INTERVAL]
DEFAULT_LOOKBACK = 10  # the seed: "the historical data for the past 10 minutes"

# Binance spot's base taker fee (VIP 0, "Trading Fee" schedule: 0.1000 % maker and taker). The
# default line a move must cross to be worth a BUY or SELL: a minute that moves less than one
# side's fee is NOOP. On BTCUSDT 1m (2026-03/04) it leaves ~88 % NOOP, close to the seed's 87 %.
BINANCE_SPOT_TAKER_FEE = 0.001
DEFAULT_THRESHOLD = BINANCE_SPOT_TAKER_FEE
DEFAULT_SEED = 3

SPLITS = ("train", "verify")
DECIMALS = Decimal("0.00000001")  # the seed's "8 decimals precision"

PARQUET_COLUMNS = (
    "id", "symbol", "open_time", "split", "prompt", "context", "accepted", "rejected",
    "advice", "open_change", "open_change_text", "prev_advice", "prev_open_change",
)


@dataclass(frozen=True)
class TimeRange:
    """Half-open ``[start, end)`` in epoch milliseconds, UTC."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise CliError(f"time range {self.text()} is empty: its end must come after its start")

    def text(self) -> str:
        return f"{_iso(self.start)}..{_iso(self.end)}"

    def overlaps(self, other: "TimeRange") -> bool:
        return self.start < other.end and other.start < self.end


def parse_range(text: str) -> TimeRange:
    """``START..END`` (end excluded); each a date ``2026-04-01``, a UTC time ``2026-04-01T12:30``
    or epoch milliseconds."""
    start, sep, end = text.partition("..")
    if not sep or not start or not end:
        raise CliError(f"time range {text!r}: write START..END, e.g. 2026-03-23..2026-04-15 (end excluded)")
    return TimeRange(_parse_instant(start), _parse_instant(end))


def _parse_instant(text: str) -> int:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{text!r} is not a date, a UTC time (2026-04-01T12:30) or epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- candles -----------------------------------------------------------------------------------


@dataclass
class Candles:
    """One symbol's 1m candles, sorted and unique by open_time, with where they came from."""

    symbol: str
    frame: pd.DataFrame
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_trade_counts(self) -> bool:
        """Whether the source recorded trade counts. A candle with volume traded but zero trades
        cannot happen on an exchange, so such a row means the count was not recorded (the spot
        CSVs leave the column empty and the kline reader turns empty into 0)."""
        f = self.frame
        return not bool(((f["volume"] > 0) & (f["trades"] <= 0)).any())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_candles(inputs: Sequence[str | Path], symbols: Sequence[str] | None = None) -> dict[str, Candles]:
    """1m candles per symbol from Binance kline files (.csv, .csv.gz, .zip: symbol and interval
    from Binance's file naming) and/or Parquet archive roots (``<root>/<SYMBOL>/1m/*.parquet``)."""
    wanted = {s.upper() for s in symbols} if symbols else None
    parts: dict[str, list[pd.DataFrame]] = {}
    sources: dict[str, list[dict[str, Any]]] = {}
    if not inputs:
        raise CliError("no --input given: pass 1m kline files or an archive root")
    for raw in inputs:
        path = Path(raw)
        if "://" in str(raw) or path.is_dir():
            for symbol, frame, source in _from_archive(str(raw), wanted):
                parts.setdefault(symbol, []).append(frame)
                sources.setdefault(symbol, []).append(source)
            continue
        if not path.exists():
            raise CliError(f"{path}: no such file or folder")
        try:
            symbol, interval = infer_symbol_interval(path)
        except InvalidKline as exc:
            raise CliError(exc.reason) from None
        if interval != INTERVAL:
            raise CliError(f"{path}: a {interval} file; the advice dataset reads 1m candles")
        if wanted is not None and symbol not in wanted:
            continue
        try:
            frame = read_kline_frame(path, symbol, interval)
        except InvalidKline as exc:
            raise CliError(exc.reason) from None
        parts.setdefault(symbol, []).append(frame)
        sources.setdefault(symbol, []).append({"path": str(path), "sha256": _sha256(path), "rows": len(frame)})
    if not parts:
        want = f" for {', '.join(sorted(wanted))}" if wanted else ""
        raise CliError(f"no 1m candles found{want} in {', '.join(map(str, inputs))}")
    out = {}
    for symbol, frames in sorted(parts.items()):
        frame = pd.concat(frames, ignore_index=True).drop_duplicates().sort_values("open_time", kind="stable")
        dup = frame["open_time"].duplicated()
        if dup.any():
            when = _iso(int(frame.loc[dup, "open_time"].iloc[0]))
            raise CliError(f"{symbol}: two different candles open at {when}; the inputs disagree")
        out[symbol] = Candles(symbol, frame.reset_index(drop=True), sources[symbol])
    return out


def _from_archive(root: str, wanted: set[str] | None) -> Iterable[tuple[str, pd.DataFrame, dict[str, Any]]]:
    """An archive root: a local folder or any fsspec URL (s3://..., memory://...)."""
    archive = ParquetArchive(root)
    try:
        entries = archive.fs.ls(archive.root, detail=False)
    except FileNotFoundError:
        raise CliError(f"{root}: no such archive") from None
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
    found = [n for n in names if archive.fs.isdir(f"{archive.root}/{n}/{INTERVAL}")]
    if not found:
        raise CliError(f"{root}: not a klines archive (no <SYMBOL>/{INTERVAL}/ folders)")
    for symbol in found:
        if wanted is not None and symbol not in wanted:
            continue
        frame = read_archive(root, symbol, INTERVAL)
        months = archive.months(symbol, INTERVAL)
        yield symbol, frame, {"archive": root, "symbol": symbol, "months": months, "rows": len(frame)}


# --- labels and texts ----------------------------------------------------------------------------


def advice_for(open_: np.ndarray, high: np.ndarray, low: np.ndarray, threshold: float) -> np.ndarray:
    """BUY / SELL / NOOP per candle: BUY when the high reached ``open * (1 + threshold)`` while the
    low stayed above ``open * (1 - threshold)`` (a long entered at the open touched its target and
    never its stop), SELL the mirror image, NOOP otherwise."""
    up = (high - open_) / open_ >= threshold
    down = (open_ - low) / open_ >= threshold
    out = np.full(open_.shape, "NOOP", dtype=object)
    out[up & ~down] = "BUY"
    out[down & ~up] = "SELL"
    return out


def decimal_text(value: Decimal | float | int) -> str:
    """A number as the seed writes it: fixed point, 8 decimals, never ``-0.00000000``."""
    d = (value if isinstance(value, Decimal) else Decimal(repr(value) if isinstance(value, float) else value))
    q = d.quantize(DECIMALS)
    if q == 0:
        q = abs(q)
    return f"{q:f}"


def _decimal(x: float) -> Decimal:
    # repr is the shortest text that reads back as the same float: for prices parsed from
    # Binance's decimal strings it is that string, so differences are exact (89.29 - 89.14 = 0.15).
    return Decimal(repr(float(x)))


# --- the build -----------------------------------------------------------------------------------


@dataclass
class AdviceConfig:
    train: TimeRange
    verify: TimeRange
    lookback: int = DEFAULT_LOOKBACK
    threshold: float = DEFAULT_THRESHOLD
    seed: int = DEFAULT_SEED

    def check(self) -> None:
        if self.lookback < 1:
            raise CliError(f"--lookback must be at least 1, got {self.lookback}")
        if not 0 < self.threshold < 1:
            raise CliError(f"--threshold is a fraction of the open price in (0, 1), got {self.threshold}")
        if self.train.overlaps(self.verify):
            raise CliError(
                f"train range {self.train.text()} and verify range {self.verify.text()} overlap; they must be disjoint"
            )
        if self.verify.start < self.train.end:
            raise CliError(
                f"verify range {self.verify.text()} starts before train range {self.train.text()} ends; "
                "verification must be a later time slice than training"
            )


def rows_for(candles: Candles, config: AdviceConfig, has_trade_counts: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The dataset rows of one symbol and what was skipped."""
    f = candles.frame
    times = f["open_time"].to_numpy(np.int64)
    opens = f["open"].to_numpy(np.float64)
    labels = advice_for(opens, f["high"].to_numpy(np.float64), f["low"].to_numpy(np.float64), config.threshold)
    open_dec = [_decimal(x) for x in opens]
    n_rows = len(f)
    change = [None] + [open_dec[i] - open_dec[i - 1] for i in range(1, n_rows)]
    change_text = [None] + [decimal_text(c) for c in change[1:]]
    volume_text = [decimal_text(_decimal(v)) for v in f["volume"].to_numpy(np.float64)]
    trades_text = [decimal_text(int(t)) for t in f["trades"].to_numpy(np.int64)] if has_trade_counts else None

    span = config.lookback + 1  # candles before the target that the context reads (one more for the first change)
    rows: list[dict[str, Any]] = []
    skipped_gap = 0
    for n in range(span, n_rows):
        first = n - span
        if times[n] - times[first] != span * MINUTE_MS:
            skipped_gap += 1  # the window crosses missing minutes
            continue
        split = next(
            (name for name, r in zip(SPLITS, (config.train, config.verify)) if r.start <= times[first] and times[n] < r.end),
            None,
        )
        if split is None:
            continue
        ctx_slice = slice(n - config.lookback, n)
        context: dict[str, list[str]] = {
            "open_changes": change_text[ctx_slice],
            "prev_volumes": volume_text[ctx_slice],
        }
        if trades_text is not None:
            context["prev_trade_counts"] = trades_text[ctx_slice]
        context_json = P.dumps(context)
        advice = labels[n]
        rng = random.Random(f"{config.seed}:{candles.symbol}:{int(times[n])}")
        rejected_advice = rng.choice([a for a in P.ADVICES if a != advice])
        rows.append(
            {
                "id": f"{candles.symbol}:{int(times[n])}",
                "symbol": candles.symbol,
                "open_time": int(times[n]),
                "split": split,
                "prompt": P.prompt_text(context_json, has_trade_counts),
                "context": context_json,
                "accepted": P.answer_text(change_text[n], advice),
                "rejected": P.answer_text(change_text[n - 1], rejected_advice),
                "advice": advice,
                "open_change": float(change[n]),
                "open_change_text": change_text[n],
                "prev_advice": labels[n - 1],
                "prev_open_change": float(change[n - 1]),
            }
        )
    return rows, {"windows_skipped_for_gaps": skipped_gap}


def build(
    inputs: Sequence[str | Path],
    out: str | Path,
    config: AdviceConfig,
    symbols: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the dataset into ``out`` (written beside it, then moved in whole); returns the manifest."""
    config.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CliError(f"{out} exists and is not empty; pass --overwrite to replace it")
    candles = load_candles(inputs, symbols)
    lacking = sorted(s for s, c in candles.items() if not c.has_trade_counts)
    # One prompt shape per dataset: if any symbol's source lacks trade counts, none carries them.
    has_trade_counts = not lacking
    all_rows: list[dict[str, Any]] = []
    per_symbol: dict[str, Any] = {}
    for symbol, c in candles.items():
        rows, skipped = rows_for(c, config, has_trade_counts)
        all_rows += rows
        per_symbol[symbol] = {
            "candles": len(c.frame),
            "first_open_time": _iso(int(c.frame["open_time"].iloc[0])) if len(c.frame) else None,
            "last_open_time": _iso(int(c.frame["open_time"].iloc[-1])) if len(c.frame) else None,
            "source_has_trade_counts": c.has_trade_counts,
            "sources": c.sources,
            **skipped,
            **{f"{s}_rows": sum(1 for r in rows if r["split"] == s) for s in SPLITS},
        }
    frame = pd.DataFrame(all_rows, columns=list(PARQUET_COLUMNS))
    for split, r in zip(SPLITS, (config.train, config.verify)):
        if not (frame["split"] == split).any():
            raise CliError(
                f"no {split} rows: no {config.lookback + 2} consecutive 1m candles of "
                f"{', '.join(candles)} open inside {r.text()}"
            )
    manifest = _manifest(frame, config, per_symbol, has_trade_counts, lacking)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            part = frame[frame["split"] == split].sort_values(["symbol", "open_time"], kind="stable")
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), tmp / f"{split}.parquet")
            write_orpo(part, tmp / "orpo" / f"{split}.parquet")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_orpo(part: pd.DataFrame, path: Path) -> None:
    """Preference pairs in the conversational format TRL's ORPO/DPO trainers read: ``prompt`` (the
    user turn), ``chosen`` and ``rejected`` (one assistant turn each); the model's own chat template
    is applied at training time, the same template llama.cpp applies when evaluating."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "prompt": [[{"role": "user", "content": p}] for p in part["prompt"]],
            "chosen": [[{"role": "assistant", "content": a}] for a in part["accepted"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in part["rejected"]],
            "id": list(part["id"]),
        }
    )
    pq.write_table(table, path)


def _manifest(
    frame: pd.DataFrame, config: AdviceConfig, per_symbol: dict[str, Any], has_trade_counts: bool, lacking: list[str]
) -> dict[str, Any]:
    counts = {
        split: {a: int(((frame["split"] == split) & (frame["advice"] == a)).sum()) for a in P.ADVICES}
        for split in SPLITS
    }
    return {
        "kind": KIND,
        "version": DATASET_VERSION,
        "prompt_version": P.PROMPT_VERSION,
        "interval": INTERVAL,
        "symbols": sorted(per_symbol),
        "lookback": config.lookback,
        "threshold": config.threshold,
        "seed": config.seed,
        "ranges": {"train": config.train.text(), "verify": config.verify.text()},
        "ranges_ms": {"train": [config.train.start, config.train.end], "verify": [config.verify.start, config.verify.end]},
        "rows": {split: int((frame["split"] == split).sum()) for split in SPLITS},
        "samples": {split: int((frame["split"] == split).sum()) for split in SPLITS},
        "advice_counts": counts,
        "has_trade_counts": has_trade_counts,
        "trade_counts_note": (
            "prev_trade_counts is in every context"
            if has_trade_counts
            else f"prev_trade_counts is left out of every context (and the prompt says so): no trade counts in the "
            f"source of {', '.join(lacking)}"
        ),
        "instruction": P.instruction(has_trade_counts),
        "label_rule": (
            f"BUY if the next candle's high >= open*(1+{config.threshold}) and its low > open*(1-{config.threshold}); "
            "SELL the mirror image; NOOP otherwise"
        ),
        "prompt_fix": "the seed's third example nested open_changes inside itself; it is flat here",
        "files": {"train": "train.parquet", "verify": "verify.parquet", "orpo": ["orpo/train.parquet", "orpo/verify.parquet"]},
        "per_symbol": per_symbol,
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"{folder}: no manifest.json; build one with klinebus dataset build --kind advice") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not JSON ({exc})") from None
    if manifest.get("kind") != KIND:
        raise CliError(f"{folder}: a {manifest.get('kind')!r} dataset, not an advice dataset")
    return manifest


def read_split(folder: str | Path, split: str) -> pd.DataFrame:
    path = Path(folder) / f"{split}.parquet"
    if not path.exists():
        raise CliError(f"{path}: missing; rebuild the dataset")
    return pd.read_parquet(path)
