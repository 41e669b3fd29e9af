"""The strict grammar on a real llama.cpp sampler: a random-weight model, pushed towards
control characters, still writes only valid, bounded JSON of the schema."""

from __future__ import annotations

import json
import re

import llama_cpp
import pytest

from libs.llm.grammar import (
    AnswerError,
    SchemaError,
    _digit_ranges,
    max_output_chars,
    parse_answer,
    schema_to_gbnf,
    validate,
)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["trend", "confidence", "levels", "tags", "ok", "summary"],
    "properties": {
        "trend": {"enum": ["bullish", "bearish", "sideways"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1, "x-decimals": 2},
        "levels": {"type": "array", "maxItems": 3, "items": {"type": "number", "minimum": 61234.5, "maximum": 63020.25, "x-decimals": 1}},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "minLength": 1, "maxLength": 8}},
        "ok": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 40},
    },
}


def control_token_bias(llm: llama_cpp.Llama, bias: float = 50.0) -> dict[int, float]:
    """Push every token that decodes to a control character or a quote/backslash way up."""
    out = {}
    for tok in range(llm.n_vocab()):
        piece = llm.detokenize([tok])
        if len(piece) == 1 and (piece[0] < 0x20 or piece[0] in (0x22, 0x5C, 0x7F)):
            out[tok] = bias
    return out


def generate(llm: llama_cpp.Llama, grammar: llama_cpp.LlamaGrammar, seed: int, bias: dict[int, float], max_tokens: int) -> dict:
    out = llm.create_completion(
        "Answer in JSON:", grammar=grammar, max_tokens=max_tokens, temperature=1.5, seed=seed, logit_bias=bias,
    )
    return out["choices"][0]


def test_grammar_forces_valid_bounded_json_from_a_random_model(text_llama):
    grammar = llama_cpp.LlamaGrammar.from_string(schema_to_gbnf(SCHEMA), verbose=False)
    bias = control_token_bias(text_llama)
    assert len(bias) >= 30  # the vocabulary does hold control characters to tempt it with
    bound = max_output_chars(SCHEMA)
    for seed in range(12):
        choice = generate(text_llama, grammar, seed, bias, bound + 1)
        text = choice["text"]
        assert choice["finish_reason"] == "stop", text  # ended by the grammar, never cut
        assert len(text) <= bound
        value = json.loads(text, strict=True)  # strict: a raw control character fails here
        validate(value, SCHEMA)
        assert not any(ord(c) < 0x20 for c in text)
        assert all(61234.5 <= v <= 63020.25 for v in value["levels"])
        assert re.fullmatch(r'\{"trend":.*"summary":".*"\}', text)  # compact, fields in schema order


def test_llama_cpp_python_own_converter_lets_control_characters_in(text_llama):
    """Why the strict converter exists (llama-cpp-python issue #1259): the same model and bias
    under the library's own schema grammar writes strings a strict JSON parser refuses."""
    loose = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(loose), verbose=False)
    bias = control_token_bias(text_llama)
    texts = [generate(text_llama, grammar, seed, bias, 60)["text"] for seed in range(4)]
    assert any(any(ord(c) < 0x20 for c in t) for t in texts)


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "string"}, "maxLength"),
        ({"type": "array", "items": {"enum": [1]}}, "maxItems"),
        ({"type": "object", "properties": {"a": {"enum": [1]}}, "required": ["a"]}, "additionalProperties"),
        ({"type": "object", "properties": {"a": {"enum": [1]}}, "additionalProperties": False}, "required"),
        ({"type": "string", "maxLength": 3, "pattern": "a+"}, "pattern"),
        ({"anyOf": [{"type": "null"}]}, "type"),
        ({"type": "number", "minimum": 5, "maximum": 1}, "minimum"),
    ],
)
def test_unsupported_or_unbounded_schemas_are_refused_in_one_line(schema, words):
    with pytest.raises(SchemaError) as err:
        schema_to_gbnf(schema)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_every_emitted_grammar_parses_in_llama_cpp():
    llama_cpp.LlamaGrammar.from_string(schema_to_gbnf(SCHEMA), verbose=False)
    llama_cpp.LlamaGrammar.from_string(schema_to_gbnf(SCHEMA, ascii_only=False), verbose=False)


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 9), (7, 7), (5, 120), (99, 101), (1234, 98765), (61234, 63020), (0, 100000)])
def test_digit_ranges_cover_exactly_the_range(lo, hi):
    pattern = re.compile("^(?:" + "|".join("".join(p) for p in _digit_ranges(lo, hi)) + ")$")
    for v in range(0, hi + 200):
        assert bool(pattern.match(str(v))) == (lo <= v <= hi), v


def test_answers_with_control_characters_or_out_of_range_values_are_refused():
    ok = '{"trend":"bullish","confidence":0.5,"levels":[62000.0],"tags":[],"ok":true,"summary":"fine"}'
    assert parse_answer(ok, SCHEMA)["trend"] == "bullish"
    for bad, words in [
        (ok.replace("fine", "fi\x1dne"), "not valid JSON"),
        (ok.replace('"fine"', '"fi\\u001dne"'), "control character"),
        (ok.replace("62000.0", "70000"), "above the maximum"),
        (ok.replace('"bullish"', '"up"'), "one of"),
        (ok.replace("0.5", "1.5"), "above the maximum"),
        (ok[:-1] + ',"extra":1}', "unexpected field"),
        (ok[:40], "not valid JSON"),
    ]:
        with pytest.raises(AnswerError) as err:
            parse_answer(bad, SCHEMA)
        assert words in err.value.reason
