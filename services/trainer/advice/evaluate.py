"""Score a model on an advice dataset's verify split, one item at a time, resumable.

Each answer is appended to a results journal (JSON lines, flushed and fsynced per item) the
moment it is known, so a run that is killed loses at most the item in flight; running the same
command again skips every item already answered and carries on. The journal's first line
records what its answers depend on (model file, prompt version, dataset); a run with anything
else refuses to mix into it.

The model sits behind ``AdviceModel`` (one method: chat messages in, answer text out), so the
harness and the scorecard arithmetic are tested on hand-made answers, and ``llama.py`` puts any
GGUF model behind it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO

import numpy as np
import pandas as pd

from libs.common.errors import CliError
from libs.llm.grammar import AnswerError
from services.trainer.advice import answer as A
from services.trainer.advice import dataset as D
from services.trainer.advice import prompt as P
from services.trainer.advice import scorecard as S

JOURNAL_VERSION = 1
RESULTS_DIR = "results"


class AdviceModel(Protocol):
    """What the harness needs of a model."""

    name: str
    fingerprint: str  # changes whenever the model's answers may change (file contents, settings)

    def answer(self, messages: list[dict[str, str]]) -> str: ...


def select_items(verify: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """All verify items, or ``limit`` of them spread evenly over the split (every k-th in time),
    so a short run sees the whole period rather than its first hours. The same ``limit`` always
    picks the same items."""
    items = verify.sort_values(["open_time", "symbol"], kind="stable").reset_index(drop=True)
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise CliError(f"--limit must be at least 1, got {limit}")
    picks = (np.arange(limit) * len(items)) // limit
    return items.iloc[picks].reset_index(drop=True)


def dataset_fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "verify.parquet").read_bytes()).hexdigest()[:16]


class Journal:
    """The append-only results file of one (model, prompt, dataset)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = header
        self.done: dict[str, dict[str, Any]] = {}
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a file without one whole line was cut off while its header was written: start it again
        if self.path.exists() and b"\n" in self.path.read_bytes():
            self._load()
        else:
            with open(self.path, "w") as fh:
                fh.write(json.dumps({"journal": self.header}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _load(self) -> None:
        raw = self.path.read_bytes()
        # A run killed mid-write leaves a last line without its newline: drop it (that item is
        # simply asked again) so the next append starts on a clean line.
        good = raw[: raw.rfind(b"\n") + 1]
        if len(good) != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(good))
        lines = good.decode().splitlines()
        try:
            header = json.loads(lines[0])["journal"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header is None:
            raise CliError(f"{self.path}: not an advice results file; pass another --results")
        mismatch = [k for k in ("model_fingerprint", "prompt_version", "dataset", "journal_version")
                    if header.get(k) != self.header.get(k)]
        if mismatch:
            raise CliError(
                f"{self.path} holds answers for a different {', '.join(mismatch)}; "
                "pass another --results (or --restart to discard them)"
            )
        for n, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise CliError(f"{self.path}:{n}: a damaged line in the middle of the file") from None
            self.done[rec["id"]] = rec

    def append(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[rec["id"]] = rec


class Progress:
    """A bar with items/s and ETA on a terminal; a plain line every few seconds otherwise."""

    PLAIN_EVERY_S = 5.0

    def __init__(self, total: int, already: int, stream: TextIO | None = None) -> None:
        self.total, self.already = total, already
        self.stream = stream or sys.stderr
        self.count = 0
        self.started = time.monotonic()
        self.last_line = 0.0
        self.rich = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.rich = RichProgress(
                TextColumn("advice"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self.task = self.rich.add_task("advice", total=total, completed=already, rate="")
            self.rich.start()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.count / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        left = self.total - self.already - self.count
        return left / r if r > 0 else None

    def advance(self) -> None:
        self.count += 1
        if self.rich is not None:
            self.rich.update(self.task, advance=1, rate=f"{self.rate():.2f} items/s")
            return
        now = time.monotonic()
        if now - self.last_line >= self.PLAIN_EVERY_S or self.already + self.count == self.total:
            self.last_line = now
            eta = self.eta_s()
            eta_text = "-" if eta is None else f"{int(eta // 60)}m{int(eta % 60):02d}s"
            print(f"advice {self.already + self.count}/{self.total} items, {self.rate():.2f} items/s, ETA {eta_text}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


@dataclass
class EvalResult:
    card: dict[str, Any]
    results_path: Path
    answered_now: int
    resumed: int


def default_results_path(dataset_dir: Path, model_name: str) -> Path:
    return dataset_dir / RESULTS_DIR / f"{Path(model_name).stem}.jsonl"


def evaluate(
    model: AdviceModel,
    dataset_dir: str | Path,
    limit: int | None = None,
    results: str | Path | None = None,
    restart: bool = False,
    progress_stream: TextIO | None = None,
    on_item: Callable[[dict[str, Any]], None] | None = None,
) -> EvalResult:
    """Ask ``model`` about every selected verify item not answered yet; return the scorecard."""
    folder = Path(dataset_dir)
    manifest = D.read_manifest(folder)
    if manifest.get("prompt_version") != P.PROMPT_VERSION:
        raise CliError(
            f"{folder} was built with prompt {manifest.get('prompt_version')}, this code asks {P.PROMPT_VERSION}; rebuild it"
        )
    verify = D.read_split(folder, "verify")
    train = D.read_split(folder, "train")
    items = select_items(verify, limit)
    has_trades = bool(manifest["has_trade_counts"])
    path = Path(results) if results else default_results_path(folder, model.name)
    if restart and path.exists():
        path.unlink()
    journal = Journal(path, {
        "journal_version": JOURNAL_VERSION,
        "model": model.name,
        "model_fingerprint": model.fingerprint,
        "prompt_version": P.PROMPT_VERSION,
        "dataset": dataset_fingerprint(folder),
    })
    todo = items[~items["id"].isin(journal.done.keys())]
    resumed = len(items) - len(todo)
    progress = Progress(len(items), resumed, progress_stream)
    try:
        for row in todo.itertuples(index=False):
            messages = P.few_shot_messages(row.prompt, has_trades)
            started = time.perf_counter()
            text = model.answer(messages)
            seconds = time.perf_counter() - started
            rec: dict[str, Any] = {"id": row.id, "raw": text, "seconds": round(seconds, 6)}
            try:
                parsed = A.parse(text)
                rec.update(advice=parsed.advice, predicted_open_change=parsed.predicted_open_change)
            except AnswerError as exc:
                rec.update(advice=None, predicted_open_change=None, error=exc.reason)
            journal.append(rec)
            progress.advance()
            if on_item is not None:
                on_item(rec)
    finally:
        progress.close()
    card = S.scorecard(items, journal.done, train, int(manifest["seed"]), model.name)
    if len(items) < len(verify):
        card["baselines_whole_split"] = S.score_baselines(verify, train, int(manifest["seed"]))
    card.update(
        dataset=str(folder),
        results=str(path),
        model_fingerprint=model.fingerprint,
        prompt_version=P.PROMPT_VERSION,
        items_selected=len(items),
        verify_items=len(verify),
        has_trade_counts=has_trades,
        threshold=manifest["threshold"],
        verify_range=manifest["ranges"]["verify"],
    )
    card_path = path.with_suffix(".scorecard.json")
    tmp = card_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, card_path)
    return EvalResult(card, path, len(todo), resumed)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"not JSON: {type(x).__name__}")
