"""Offline scorecard: a chart dataset (``klinebus charts dataset``) analysed by a model, each
call scored against the next candle beside the same baselines as live scoring, with the
seconds each chart took. The VLM is not trained here, so any slice is unseen by it; the
latest charts of the index are used (``limit``) so the figures describe recent markets."""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from libs.common.contracts import ChartEvent
from libs.common.klines import Kline
from libs.llm.runtime import LLMError
from services.vlm.analysis import PriceFrame
from services.vlm.analyst import AnalysisRefused, Analyst
from libs.common.artefacts import ArtefactRoot
from services.vlm.image import UnreadableImage, load_chart_png
from services.vlm.scoring import CALLS, PREDICTORS, Pending, Scoreboard


@dataclass
class Scorecard:
    model: str
    charts: int = 0
    analysed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    seconds: list[float] = field(default_factory=list)
    hits: dict[str, dict[str, int]] = field(default_factory=dict)
    phase_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        s = sorted(self.seconds)
        return {
            "model": self.model,
            "charts": self.charts,
            "analysed": self.analysed,
            "failed": self.failed,
            "retried": self.retried,
            "seconds_per_chart": {
                "mean": round(statistics.fmean(s), 3) if s else None,
                "p50": round(s[len(s) // 2], 3) if s else None,
                "max": round(s[-1], 3) if s else None,
            },
            "mean_ms_by_phase": {k: round(v / self.analysed, 1) for k, v in self.phase_ms.items()} if self.analysed else {},
            "hit_rate": {
                call: {p: (round(self.hits[call][p] / self.analysed, 4) if self.analysed else None) for p in PREDICTORS}
                for call in CALLS
            },
        }


def read_index(folder: Path, limit: int | None) -> list[dict[str, str]]:
    with open(folder / "index.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("next_close")]
    rows.sort(key=lambda r: int(r["last_open_time"]))
    return rows[-limit:] if limit else rows


async def evaluate(
    folder: Path, candles: list[Kline], analyst: Analyst, *, limit: int | None, flat_bps: float, max_side: int
) -> Scorecard:
    by_time = {k.open_time: k for k in candles}
    times = sorted(by_time)
    card = Scorecard(analyst.backend.model_name)
    card.hits = {c: {p: 0 for p in PREDICTORS} for c in CALLS}
    board = Scoreboard(window=10**9, flat_bps=flat_bps)
    root = ArtefactRoot(str(folder))  # a dataset's charts: read from its folder only
    for row in read_index(folder, limit):
        card.charts += 1
        first, last = int(row["first_open_time"]), int(row["last_open_time"])
        shown = [by_time[t] for t in times if first <= t <= last]
        if not shown or shown[-1].open_time != last:
            card.failed["no_candles"] = card.failed.get("no_candles", 0) + 1
            continue
        frame = PriceFrame.of(shown)
        chart = ChartEvent(
            symbol=row["symbol"], interval=row["interval"], open_time=last, first_open_time=first,
            uri=str(folder / row["image"]), window=len(shown), preset="dataset", width=0, height=0,
        )
        started = time.perf_counter()
        try:
            png, _, _ = load_chart_png(chart.uri, max_side, root)
            result = await analyst.analyse(chart, frame, png)
        except (AnalysisRefused, UnreadableImage, LLMError) as exc:
            why = type(exc).__name__
            card.failed[why] = card.failed.get(why, 0) + 1
            continue
        card.seconds.append(time.perf_counter() - started)
        card.analysed += 1
        card.retried += result.attempts - 1
        for phase, ms in result.timings_ms.items():
            card.phase_ms[phase] = card.phase_ms.get(phase, 0.0) + ms
        p = Pending(chart.symbol, chart.interval, last, last, frame.last_close, frame.prev_close, result.answer.signal, result.answer.trend)
        _, hits = board.score(p, float(row["next_close"]))
        for (call, predictor), hit in hits.items():
            card.hits[call][predictor] += int(hit)
    return card


def format_card(card: Scorecard) -> str:
    d = card.as_dict()
    lines = [
        f"model {d['model']}: {d['analysed']} of {d['charts']} charts analysed, {d['retried']} retried, failed {d['failed'] or 'none'}",
        "seconds per chart: mean {mean} p50 {p50} max {max}".format(**d["seconds_per_chart"])
        + "; mean ms by phase: " + ", ".join(f"{k} {v}" for k, v in d["mean_ms_by_phase"].items()),
        f"{'call':<8}" + "".join(f"{p:>11}" for p in PREDICTORS),
    ]
    for call in CALLS:
        lines.append(f"{call:<8}" + "".join(f"{'-' if v is None else f'{v:.3f}':>11}" for v in d["hit_rate"][call].values()))
    return "\n".join(lines)
