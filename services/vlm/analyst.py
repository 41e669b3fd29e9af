"""One chart -> one validated answer: prompt, grammar, model call, checks, one retry.

Bus-free: the app hands it a chart, the candles it shows and the bounded image, and gets an
``Analysis`` or an exception whose message is the dead letter's reason."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from libs.common.contracts import AnalysisEvent, ChartEvent
from libs.llm.grammar import AnswerError, max_output_chars, schema_to_gbnf
from libs.llm.runtime import ChatBackend, image_message
from services.vlm.analysis import (
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    Answer,
    PriceFrame,
    answer_schema,
    check_answer,
    retry_prompt,
    user_prompt,
)

ATTEMPTS = 2  # the first answer and one retry that is told what was wrong


class AnalysisRefused(ValueError):
    """Both attempts gave answers that are no valid analysis; ``reason`` says why (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Analysis:
    answer: Answer
    attempts: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)


class Analyst:
    def __init__(
        self, backend: ChatBackend, *, timeout_s: float, temperature: float = 0.0, seed: int | None = 0,
        summary_max_chars: int = 240,
    ) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.seed = seed
        self.summary_max_chars = summary_max_chars

    async def analyse(self, chart: ChartEvent, frame: PriceFrame, png: bytes) -> Analysis:
        schema = answer_schema(frame, self.summary_max_chars)
        grammar = schema_to_gbnf(schema)
        # the grammar bounds every answer's length; one more token for end-of-generation
        max_tokens = max_output_chars(schema) + 1
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, image_message(user_prompt(chart, frame), png)]
        timings: dict[str, float] = {}
        refusals: list[str] = []
        deadline = time.monotonic() + self.timeout_s  # one deadline for the chart, retry included
        for attempt in range(1, ATTEMPTS + 1):
            reply = await self.backend.chat(
                messages, grammar=grammar, max_tokens=max_tokens, timeout_s=max(deadline - time.monotonic(), 0.001),
                temperature=self.temperature, seed=None if self.seed is None else self.seed + attempt - 1,
            )
            for k, v in reply.timings_ms.items():
                timings[k] = round(timings.get(k, 0.0) + v, 3)
            try:
                if reply.finish_reason == "length":
                    raise AnswerError(f"answer cut at {max_tokens} tokens (the backend did not apply the grammar)")
                return Analysis(check_answer(reply.text, schema), attempt, timings, refusals)
            except AnswerError as exc:
                refusals.append(exc.reason)
                messages = messages + [
                    {"role": "assistant", "content": reply.text[:4000]},
                    {"role": "user", "content": retry_prompt(exc.reason)},
                ]
        raise AnalysisRefused(f"no valid answer in {ATTEMPTS} attempts: " + " / ".join(refusals))


def analysis_event(
    chart: ChartEvent, frame: PriceFrame, result: Analysis, *, model: str, revision: str, backend: str,
    image_prep_ms: float,
) -> AnalysisEvent:
    a = result.answer
    return AnalysisEvent(
        symbol=chart.symbol,
        interval=chart.interval,
        open_time=chart.open_time,
        chart_uri=chart.uri,
        model=model,
        model_revision=revision,
        backend=backend,
        prompt_version=PROMPT_VERSION,
        trend=a.trend,
        confidence=a.confidence,
        support=a.support,
        resistance=a.resistance,
        patterns=a.patterns,
        signal=a.signal,
        summary=a.summary,
        attempts=result.attempts,
        price_low=frame.low,
        price_high=frame.high,
        last_close=frame.last_close,
        timings_ms={"image_prep": round(image_prep_ms, 3), **result.timings_ms},
    )
