"""A strict, bounded JSON-schema -> GBNF converter and a validator for the same subset.

Why not llama-cpp-python's ``LlamaGrammar.from_json_schema``: its string rule admits raw
control characters (its issue #1259), so a model can emit a "JSON" answer that a strict
parser refuses, and its unbounded repetitions let a weak model ramble until ``max_tokens``
cuts the JSON in half. Here:

* strings are printable characters only (ASCII by default), the only escapes are ``\\"`` and
  ``\\\\``; no control character can appear, raw or escaped;
* every string needs ``maxLength`` and every array ``maxItems``; numbers have bounded digits
  and no exponent, so every answer the grammar admits has a length bound
  (``max_output_chars``): a ``max_tokens`` above it can never truncate an answer;
* objects are closed: every property is required and emitted in schema order, nothing else;
* output is compact (no free whitespace), so the bound is tight and outputs are canonical;
* unsupported keywords are refused with a one-line ``SchemaError``, never silently ignored.

Supported: ``type`` object/array/string/number/integer/boolean/null, ``enum``, ``const``,
``properties``/``required``/``additionalProperties: false``, ``items``/``minItems``/``maxItems``,
``minLength``/``maxLength``, ``minimum``/``maximum``, ``description``/``title`` (ignored), and
``x-decimals`` (our keyword): a number with both ``minimum`` and ``maximum`` is written with
exactly that many decimals (default 2) and the grammar admits only values inside the range,
so a model cannot even spell a price level off the chart. ``validate`` checks the range but not
the decimals (an unconstrained server may write more digits, which is no error).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

INT_DIGITS = 12  # digits before the point: prices up to 10^12
FRAC_DIGITS = 8  # digits after it: Binance's finest tick is 1e-8
IGNORED = {"description", "title", "$comment", "examples", "default"}
ALLOWED = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength", "enum", "const"},
    "number": {"type", "minimum", "maximum", "enum", "const", "x-decimals"},
    "integer": {"type", "minimum", "maximum", "enum", "const"},
    "boolean": {"type", "enum", "const"},
    "null": {"type"},
    None: {"enum", "const"},
}
ASCII_CHAR = r"[\x20\x21\x23-\x5B\x5D-\x7E]"
UNICODE_CHAR = r"[^\x00-\x1F\x7F\x22\x5C]"
ESCAPE = r'"\\" ["\\]'


class SchemaError(ValueError):
    """The schema uses something this converter does not support (one line)."""


class AnswerError(ValueError):
    """A model answer that is not valid for its schema; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kind(schema: dict[str, Any], where: str) -> str | None:
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a schema must be an object, got {type(schema).__name__}")
    t = schema.get("type")
    if t is None and "enum" not in schema and "const" not in schema:
        raise SchemaError(f"{where}: needs a 'type', 'enum' or 'const'")
    if t is not None and t not in ALLOWED:
        raise SchemaError(f"{where}: type {t!r} is not supported (one of object, array, string, number, integer, boolean, null)")
    extra = set(schema) - ALLOWED[t] - IGNORED
    if extra:
        raise SchemaError(f"{where}: unsupported keyword(s) {', '.join(sorted(extra))} for type {t}")
    return t


class _Builder:
    def __init__(self, ascii_only: bool) -> None:
        self.rules: dict[str, str] = {}
        self.char = ASCII_CHAR if ascii_only else UNICODE_CHAR

    def add(self, name: str, body: str) -> str:
        name = re.sub(r"[^a-zA-Z0-9-]", "-", name).strip("-") or "value"
        base, n = name, 1
        while name in self.rules and self.rules[name] != body:
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        return name

    def visit(self, schema: dict[str, Any], name: str, where: str) -> str:
        t = _kind(schema, where)
        if "const" in schema:
            return self.add(name, _literal(json.dumps(schema["const"], separators=(",", ":"))))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            return self.add(name, " | ".join(_literal(json.dumps(v, separators=(",", ":"))) for v in values))
        if t == "object":
            return self.visit_object(schema, name, where)
        if t == "array":
            return self.visit_array(schema, name, where)
        if t == "string":
            lo, hi = _string_bounds(schema, where)
            return self.add(name, f'"\\"" ({self.char} | {ESCAPE}){{{lo},{hi}}} "\\""')
        if t in ("number", "integer"):
            return self.add(name, _number_rule(schema, t == "integer"))
        if t == "boolean":
            return self.add(name, '"true" | "false"')
        return self.add(name, '"null"')

    def visit_object(self, schema: dict[str, Any], name: str, where: str) -> str:
        props = schema.get("properties") or {}
        if not isinstance(props, dict) or not props:
            raise SchemaError(f"{where}: an object needs 'properties'")
        if schema.get("additionalProperties", None) is not False:
            raise SchemaError(f"{where}: an object must set additionalProperties: false (closed objects only)")
        missing = [p for p in props if p not in (schema.get("required") or [])]
        if missing or set(schema.get("required") or []) - set(props):
            raise SchemaError(f"{where}: every property must be required and declared (check {', '.join(missing) or 'required'})")
        parts = []
        for i, (key, sub) in enumerate(props.items()):
            rule = self.visit(sub, f"{name}-{key}", f"{where}.{key}")
            sep = '"{"' if i == 0 else '","'
            parts.append(f"{sep} {_literal(json.dumps(key) + ':')} {rule}")
        return self.add(name, " ".join(parts) + ' "}"')

    def visit_array(self, schema: dict[str, Any], name: str, where: str) -> str:
        if "items" not in schema:
            raise SchemaError(f"{where}: an array needs 'items'")
        lo, hi = _array_bounds(schema, where)
        if _no_values(schema["items"]):
            if lo > 0:
                raise SchemaError(f"{where}: minItems {lo} but no number fits the items' range")
            return self.add(name, '"[]"')  # e.g. supports when the last close is the window's low
        item = self.visit(schema["items"], f"{name}-item", f"{where}[]")
        if hi == 0:
            return self.add(name, '"[]"')
        body = f'{item} ("," {item}){{{max(lo - 1, 0)},{hi - 1}}}'
        return self.add(name, f'"[" {body} "]"' if lo > 0 else f'"[" ({body})? "]"')


def _bounds(schema: dict[str, Any], where: str, kind: str, low: str, high: str) -> tuple[int, int]:
    hi = schema.get(high)
    if not isinstance(hi, int) or hi < 0:
        raise SchemaError(f"{where}: {kind} needs an integer {high} (answers must be bounded)")
    lo = schema.get(low, 0)
    if not isinstance(lo, int) or not 0 <= lo <= hi:
        raise SchemaError(f"{where}: {low} must be an integer in [0, {high}]")
    return lo, hi


def _string_bounds(schema: dict[str, Any], where: str) -> tuple[int, int]:
    return _bounds(schema, where, "a string", "minLength", "maxLength")


def _array_bounds(schema: dict[str, Any], where: str) -> tuple[int, int]:
    return _bounds(schema, where, "an array", "minItems", "maxItems")


DEFAULT_DECIMALS = 2


def _decimals(schema: dict[str, Any], integer: bool) -> int:
    d = 0 if integer else schema.get("x-decimals", DEFAULT_DECIMALS)
    if not isinstance(d, int) or not 0 <= d <= FRAC_DIGITS:
        raise SchemaError(f"x-decimals must be an integer in [0, {FRAC_DIGITS}], got {d!r}")
    return d


def _scaled_bounds(schema: dict[str, Any], integer: bool) -> tuple[int, int, int] | None:
    """(lo, hi, decimals) of a bounded number as integers of 10^-decimals, or None if unbounded."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
        return None
    if lo < 0 or lo > hi:
        raise SchemaError(f"a bounded number needs 0 <= minimum <= maximum, got {lo}..{hi}")
    d = _decimals(schema, integer)
    scale = 10**d
    a, b = math.ceil(round(lo * scale, 6)), math.floor(round(hi * scale, 6))
    if len(str(b)) > INT_DIGITS + FRAC_DIGITS:
        raise SchemaError(f"maximum {hi} with {d} decimals needs more than {INT_DIGITS + FRAC_DIGITS} digits")
    return a, b, d


def _no_values(schema: dict[str, Any]) -> bool:
    """A bounded number whose range holds no value at its precision (e.g. 105.37..105.37 in
    whole numbers)."""
    t = schema.get("type") if isinstance(schema, dict) else None
    if t not in ("number", "integer") or "enum" in schema or "const" in schema:
        return False
    bounded = _scaled_bounds(schema, t == "integer")
    return bounded is not None and bounded[0] > bounded[1]


def _digit_ranges(lo: int, hi: int) -> list[list[str]]:
    """Same-length digit patterns (each a list of one-character classes) covering exactly the
    integers ``lo..hi`` (the classic range-to-pattern split at ...9 and ...0 boundaries)."""
    stops = {hi}
    k = 1
    while True:
        stop = int(str(lo)[:-k] + "9" * k) if k < len(str(lo)) else int("9" * k)
        if not lo <= stop < hi:
            break
        stops.add(stop)
        k += 1
    k = 1
    while True:
        stop = (hi + 1) - (hi + 1) % 10**k - 1
        if not lo < stop <= hi:
            break
        stops.add(stop)
        k += 1
    out, start = [], lo
    for stop in sorted(stops):
        a, b = str(start), str(stop)
        assert len(a) == len(b), (start, stop)
        out.append([x if x == y else f"[{x}-{y}]" for x, y in zip(a, b)])
        start = stop + 1
    return out


def _range_rule(lo: int, hi: int, d: int) -> str:
    """GBNF for the numbers lo..hi (integers of 10^-d) written with exactly d decimals."""
    if lo > hi:
        raise SchemaError("empty numeric range")
    branches = []
    for digits in _digit_ranges(lo, hi):
        if d == 0:
            parts = digits
        elif len(digits) > d:
            parts = digits[: len(digits) - d] + ['"."'] + digits[len(digits) - d :]
        else:
            parts = ['"0."'] + ['"0"'] * (d - len(digits)) + digits
        branches.append(" ".join(p if p.startswith(("[", '"')) else f'"{p}"' for p in parts))
    return " | ".join(f"({b})" for b in branches)


def _number_rule(schema: dict[str, Any], integer: bool) -> str:
    bounded = _scaled_bounds(schema, integer)
    if bounded is not None:
        return _range_rule(*bounded)
    minimum = schema.get("minimum")
    sign = "" if isinstance(minimum, (int, float)) and minimum >= 0 else '"-"? '
    whole = f'("0" | [1-9] [0-9]{{0,{INT_DIGITS - 1}}})'
    frac = "" if integer else f' ("." [0-9]{{1,{FRAC_DIGITS}}})?'
    return f"{sign}{whole}{frac}"


def schema_to_gbnf(schema: dict[str, Any], *, ascii_only: bool = True) -> str:
    """The GBNF grammar (root rule ``root``) admitting exactly the compact JSON texts of ``schema``."""
    b = _Builder(ascii_only)
    top = b.visit(schema, "root-value", "$")
    lines = [f"root ::= {top}"] + [f"{k} ::= {v}" for k, v in b.rules.items()]
    return "\n".join(lines) + "\n"


def max_output_chars(schema: dict[str, Any]) -> int:
    """An upper bound on the length of any text ``schema_to_gbnf(schema)`` admits (an escape
    counts two characters). With single-byte tokens in the vocabulary, also a bound on tokens."""
    t = _kind(schema, "$")
    if "const" in schema:
        return len(json.dumps(schema["const"], separators=(",", ":")))
    if "enum" in schema:
        return max(len(json.dumps(v, separators=(",", ":"))) for v in schema["enum"])
    if t == "object":
        props = schema["properties"]
        return 2 + (len(props) - 1) + sum(len(json.dumps(k)) + 1 + max_output_chars(s) for k, s in props.items())
    if t == "array":
        _, hi = _array_bounds(schema, "$")
        if _no_values(schema["items"]):
            return 2
        return 2 + hi * max_output_chars(schema["items"]) + max(hi - 1, 0)
    if t == "string":
        return 2 + 2 * _string_bounds(schema, "$")[1]
    if t in ("number", "integer"):
        bounded = _scaled_bounds(schema, t == "integer")
        if bounded is not None:
            lo, hi, d = bounded
            return max(len(str(hi)) + (1 if d else 0), d + 2)
        return 1 + INT_DIGITS + (0 if t == "integer" else 1 + FRAC_DIGITS)
    return 5  # false / null


def parse_answer(text: str, schema: dict[str, Any]) -> Any:
    """Parse a model's answer strictly (no control characters in strings) and validate it."""
    try:
        value = json.loads(text, strict=True)
    except (json.JSONDecodeError, TypeError) as exc:
        preview = text[:60] if isinstance(text, str) else repr(text)[:60]
        raise AnswerError(f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}) in {preview!r}") from None
    validate(value, schema)
    return value


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Raise ``AnswerError`` naming the first place where ``value`` does not fit ``schema``."""
    t = schema.get("type")
    if "const" in schema and value != schema["const"]:
        raise AnswerError(f"{where}: must be {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise AnswerError(f"{where}: must be one of {', '.join(map(str, schema['enum']))}, got {value!r}"[:200])
    if t == "object":
        if not isinstance(value, dict):
            raise AnswerError(f"{where}: must be an object")
        props = schema.get("properties", {})
        extra = set(value) - set(props)
        if extra and schema.get("additionalProperties", True) is False:
            raise AnswerError(f"{where}: unexpected field(s) {', '.join(sorted(extra))}"[:200])
        for key in schema.get("required", []):
            if key not in value:
                raise AnswerError(f"{where}: missing field {key!r}")
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
    elif t == "array":
        if not isinstance(value, list):
            raise AnswerError(f"{where}: must be a list")
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            raise AnswerError(f"{where}: {len(value)} items, allowed {schema.get('minItems', 0)}..{schema.get('maxItems')}")
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]")
    elif t == "string":
        if not isinstance(value, str):
            raise AnswerError(f"{where}: must be a string")
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf):
            raise AnswerError(f"{where}: length {len(value)} outside {schema.get('minLength', 0)}..{schema.get('maxLength')}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise AnswerError(f"{where}: contains a control character")
    elif t in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AnswerError(f"{where}: must be a finite number, got {value!r}")
        if t == "integer" and not isinstance(value, int):
            raise AnswerError(f"{where}: must be an integer, got {value!r}")
        if "minimum" in schema and value < schema["minimum"]:
            raise AnswerError(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise AnswerError(f"{where}: {value} is above the maximum {schema['maximum']}")
    elif t == "boolean" and not isinstance(value, bool):
        raise AnswerError(f"{where}: must be true or false")
    elif t == "null" and value is not None:
        raise AnswerError(f"{where}: must be null")
