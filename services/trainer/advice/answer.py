"""The answer grammar and parser: libs/llm's strict builder, the change kept a decimal string.

libs/llm's JSON-schema -> GBNF builder has no regular-expression ``pattern`` (on purpose: every
rule there is bounded), so a plain ``string`` would let a model put any text in
``predicted_open_change``. The grammar here is the builder's output for the same object with the
change as a ``number`` (sign, at most 12 integer digits, at most 8 decimals, no exponent), with
that one rule wrapped in quotes: the answer stays the seed's string form and can only hold a
decimal. Parsing goes through libs/llm's strict parser, then checks the same decimal form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from libs.llm.grammar import AnswerError, max_output_chars, parse_answer, schema_to_gbnf
from services.trainer.advice.prompt import ANSWER_SCHEMA

CHANGE_KEY = "predicted_open_change"
DECIMAL = re.compile(r"^-?(0|[1-9][0-9]{0,11})(\.[0-9]{1,8})?$")


def _number_schema() -> dict:
    props = dict(ANSWER_SCHEMA["properties"])
    props[CHANGE_KEY] = {"type": "number"}
    return {**ANSWER_SCHEMA, "properties": props}


def grammar() -> str:
    """GBNF admitting exactly ``{"predicted_open_change":"<decimal>","advice":"BUY|NOOP|SELL"}``."""
    text = schema_to_gbnf(_number_schema())
    rule = re.compile(r"^(\S*predicted-open-change) ::= (.+)$", re.MULTILINE)
    found = rule.findall(text)
    if len(found) != 1:
        raise RuntimeError(f"libs/llm's grammar no longer has one {CHANGE_KEY} rule: {found}")
    return rule.sub(lambda m: f'{m.group(1)} ::= "\\"" ({m.group(2)}) "\\""', text)


def max_answer_chars() -> int:
    """The longest answer the grammar admits (two quotes more than the number form)."""
    return max_output_chars(_number_schema()) + 2


@dataclass(frozen=True)
class Answer:
    advice: str
    predicted_open_change: float


def parse(text: str) -> Answer:
    """A model's answer, or ``AnswerError`` with a one-line reason."""
    value = parse_answer(text, ANSWER_SCHEMA)
    change = value[CHANGE_KEY]
    if not DECIMAL.match(change):
        raise AnswerError(f"$.{CHANGE_KEY}: {change!r} is not a decimal number")
    return Answer(value["advice"], float(change))
