"""The seed's prompt, its three examples and the answer's JSON schema.

Seed 003 trained on ``<instruction> ### Input:<context JSON>`` and evaluated 3-shot, with three
user/assistant example pairs in an Ollama Modelfile. The instruction and the examples below are
the seed's text, with two deliberate changes:

* the seed's third example nests its context inside itself
  (``{"open_changes": {"open_changes": [...], ...}}``), a copy-paste slip that shows the model a
  shape no real input has; here it is the flat object the other two examples and every dataset
  row use;
* where the source candles carry no trade counts (the shipped spot files do not), the
  instruction says so and ``prev_trade_counts`` is left out of every context, the examples'
  included, instead of being filled with zeros the model would read as "no trades".

* answers (the examples' assistant turns, the dataset's ``accepted`` and ``rejected``) are
  compact JSON, ``{"predicted_open_change":"0.00000100","advice":"NOOP"}``: the one form the
  answer grammar admits (libs/llm emits closed, compact objects), so what a model is shown,
  what it is fine-tuned on and what it may answer are the same text.

The seed's examples hold 9 entries per list (from BNBBTC); the dataset's contexts hold
``lookback`` (default 10). They are kept as the seed wrote them; ``PROMPT_VERSION`` changes
whenever any text here does, and results of different versions are never mixed.
"""

from __future__ import annotations

import json
from typing import Any

PROMPT_VERSION = "seed003-v1"

ADVICES = ("BUY", "NOOP", "SELL")

INSTRUCTION = (
    "Analyse the following exchange data, predict the next minute's change and advise. "
    "Respond in a JSON object with 2 properties: predicted_open_change (8 decimals precision), "
    "and advice (BUY, NOOP or SELL)"
)
NO_TRADE_COUNTS_NOTE = (
    " Trade counts are not available for this market, so the input has no prev_trade_counts."
)
INPUT_MARK = " ### Input:"

# The seed's three examples (its Modelfile), third one un-nested.
SEED_EXAMPLES: tuple[tuple[dict[str, list[str]], dict[str, str]], ...] = (
    (
        {
            "open_changes": ["0.00000000", "0.00000100", "0.00000200", "0.00000200", "0.00000000",
                             "0.00000000", "0.00000000", "0.00000600", "-0.00000200"],
            "prev_volumes": ["8.00100000", "42.01600000", "27.32200000", "10.70700000", "0.94300000",
                             "21.98400000", "0.44200000", "8.99100000", "28.25900000"],
            "prev_trade_counts": ["30.00000000", "90.00000000", "82.00000000", "20.00000000", "17.00000000",
                                  "42.00000000", "12.00000000", "31.00000000", "40.00000000"],
        },
        {"predicted_open_change": "0.00000100", "advice": "NOOP"},
    ),
    (
        {
            "open_changes": ["-0.00000100", "-0.00000100", "-0.00000200", "-0.00000200", "-0.00000100",
                             "0.00000000", "0.00000000", "0.00000000", "-0.00000800"],
            "prev_volumes": ["13.46200000", "5.18300000", "12.34300000", "5.39900000", "1.79600000",
                             "2.25400000", "4.99300000", "2.43600000", "30.93300000"],
            "prev_trade_counts": ["32.00000000", "22.00000000", "39.00000000", "29.00000000", "8.00000000",
                                  "16.00000000", "12.00000000", "14.00000000", "58.00000000"],
        },
        {"predicted_open_change": "0.00001400", "advice": "BUY"},
    ),
    (
        {
            "open_changes": ["0.00000200", "0.00000000", "0.00000100", "0.00000100", "0.00000300",
                             "0.00001200", "-0.00000100", "0.00000400", "-0.00000300"],
            "prev_volumes": ["4.15000000", "16.40700000", "31.36700000", "18.10100000", "34.54500000",
                             "107.80700000", "19.64000000", "48.10800000", "39.62100000"],
            "prev_trade_counts": ["20.00000000", "32.00000000", "47.00000000", "46.00000000", "70.00000000",
                                  "153.00000000", "22.00000000", "54.00000000", "67.00000000"],
        },
        {"predicted_open_change": "-0.00002200", "advice": "SELL"},
    ),
)

# The answer: the seed's two properties, the change a decimal string (the seed's "8 decimals
# precision"), the advice one of three words. See ``answer`` for the grammar built from it.
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "predicted_open_change": {"type": "string", "maxLength": 22},
        "advice": {"type": "string", "enum": list(ADVICES)},
    },
    "required": ["predicted_open_change", "advice"],
    "additionalProperties": False,
}


def dumps(obj: Any) -> str:
    """A context as the seed wrote it (Python's default separators, key order kept)."""
    return json.dumps(obj, ensure_ascii=True)


def answer_text(open_change: str, advice: str) -> str:
    """One answer in the compact form the grammar admits."""
    return json.dumps({"predicted_open_change": open_change, "advice": advice}, separators=(",", ":"))


def instruction(has_trade_counts: bool) -> str:
    return INSTRUCTION + ("" if has_trade_counts else NO_TRADE_COUNTS_NOTE)


def prompt_text(context_json: str, has_trade_counts: bool) -> str:
    """The exact user text of one item: instruction, the seed's ``### Input:`` mark, the context."""
    return instruction(has_trade_counts) + INPUT_MARK + context_json


def example_messages(has_trade_counts: bool) -> list[dict[str, str]]:
    """The seed's three shots as chat messages (trade counts dropped where the data has none)."""
    messages: list[dict[str, str]] = []
    for context, answer in SEED_EXAMPLES:
        shown = dict(context) if has_trade_counts else {k: v for k, v in context.items() if k != "prev_trade_counts"}
        messages.append({"role": "user", "content": prompt_text(dumps(shown), has_trade_counts)})
        messages.append({"role": "assistant", "content": answer_text(answer["predicted_open_change"], answer["advice"])})
    return messages


def few_shot_messages(prompt: str, has_trade_counts: bool) -> list[dict[str, str]]:
    """The seed's 3-shot conversation ending with the item's prompt."""
    return example_messages(has_trade_counts) + [{"role": "user", "content": prompt}]
