"""How events sit in stream entries, and how a batch of entries becomes events.

Each entry has one field, ``__data__``, holding the event's JSON and nothing else, so a
subscriber in any language can ``XREAD`` and parse it. A batch is validated in one pydantic
call over a JSON array of the entries (one call instead of one per entry); when any entry of
the batch is bad, the batch is decoded entry by entry so the bad ones can be dead-lettered
alone with their own reason.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import hiredis
import orjson
import redis.asyncio as aioredis
from faststream.redis.parser.message import MessageFormat
from pydantic import TypeAdapter, ValidationError
from pydantic_core import SchemaValidator

from libs.common.contracts import InvalidEvent
from libs.common.klines import InvalidKline

# The one field of a stream entry that holds the event (faststream's name for it).
DATA_FIELD = "__data__"
DATA_FIELD_B = DATA_FIELD.encode()

# Errors that mean "this message is bad", never "try again later".
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    InvalidEvent,
    InvalidKline,
    ValidationError,
    json.JSONDecodeError,  # orjson's error is a subclass
    UnicodeDecodeError,
)

# A client waits at most this long for any reply; a blocking read asks for less, so a silent
# network partition surfaces as a timeout (waited out) instead of a read that never returns.
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0


class PlainJSONFormat(MessageFormat):
    """faststream's publishers write the event's JSON and nothing else.

    faststream's default framing is a binary envelope only faststream reads;
    subscribers in other languages must be able to ``XREAD`` and parse JSON.
    """

    __slots__ = ()

    @classmethod
    async def encode(cls, *, message, reply_to, headers, correlation_id, serializer=None, codec=None) -> bytes:
        msg = await cls.build(
            message=message,
            reply_to=reply_to,
            headers=headers,
            correlation_id=correlation_id,
            serializer=serializer,
            codec=codec,
        )
        return msg.data

    @classmethod
    def parse(cls, data: bytes) -> tuple[bytes, dict[str, Any]]:
        return data, {"content-type": "application/json"}


def is_cluster_url(url: str) -> bool:
    return url.startswith(("redis+cluster://", "rediss+cluster://"))


def plain_url(url: str) -> str:
    return url.replace("+cluster://", "://", 1)


class HiredisPackedConnection(aioredis.Connection):
    """Commands packed by hiredis (C) instead of redis-py's Python loop: a guarded publish of a
    1000-event batch is ~3,000 arguments, and packing them cost ~1.7 us per event in Python,
    ~0.5 us here. Falls back to redis-py's packer for anything hiredis does not take."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # 'XGROUP CREATE' is two arguments
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)


def redis_client(url: str, *, timeouts: bool = False) -> aioredis.Redis:
    """A plain redis-py asyncio client for the same server (admin work, consumers, guards).

    ``timeouts``: bounded socket waits (consumer loops); off for callers that issue their own
    long blocking reads."""
    kw: dict[str, Any] = {}
    if timeouts:
        kw = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
    if is_cluster_url(url):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(plain_url(url), **kw)  # type: ignore[return-value]
    if url.startswith("redis://"):  # plain TCP; TLS and unix sockets keep their own classes
        kw["connection_class"] = HiredisPackedConnection
    return aioredis.Redis.from_url(url, **kw)


def one_line(exc: BaseException) -> str:
    """Why a message is bad, in one line."""
    if isinstance(exc, (InvalidEvent, InvalidKline)):
        return exc.reason
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc}"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return f"malformed JSON: {first.get('msg')}"
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        return f"{exc.title}: {where}: {first.get('msg')} (input {str(first.get('input'))[:80]!r})"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# The largest event a consumer parses (KLINEBUS_MAX_EVENT_BYTES): a bigger entry is refused by its
# length, before any parsing, so one oversized entry costs no more memory than its own bytes. The
# largest real events (models.v1 with its metrics, features.v1 of a wide feature set) are a few KB.
MAX_EVENT_BYTES = 1 << 20


class OversizedEvent(InvalidEvent):
    """An entry longer than the decoder's cap: refused unparsed."""


class Decoder:
    """Entries of one topic -> events of one model."""

    def __init__(self, model: type, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self._many = TypeAdapter(list[model])  # type: ignore[valid-type]
        self._fast = _kline_fast_path(model)

    def _check_size(self, raw: Any) -> None:
        if not isinstance(raw, (bytes, bytearray, memoryview, str)):
            raise InvalidEvent(f"payload is a {type(raw).__name__}, not bytes")
        if len(raw) > self.max_bytes:
            raise OversizedEvent(f"payload of {len(raw)} bytes is over the {self.max_bytes}-byte cap")

    def one(self, raw: bytes) -> Any:
        self._check_size(raw)
        try:
            return self.model.model_validate_json(raw)
        except ValidationError as exc:
            # The contract's own one-line form (``Model: field: msg``) where it has one.
            if exc.errors()[0].get("type") == "json_invalid":
                raise InvalidEvent(one_line(exc)) from None
            from_json = getattr(self.model, "from_json", None)
            if from_json is not None:
                from_json(raw)  # raises InvalidEvent with the contract's wording
            raise

    def many(self, raws: Sequence[bytes | None]) -> tuple[list[Any], dict[int, str]]:
        """``(events, bad)``: ``events[i]`` is entry i's event, or None where ``bad[i]`` says why.
        A missing payload (``None``: the entry had no ``__data__`` field) is bad input."""
        if raws and all(r is not None and len(r) <= self.max_bytes for r in raws):
            if self._fast is not None:
                events = self._fast(raws)
                if events is not None:
                    return events, {}
            try:
                events = self._many.validate_json(b"[" + b",".join(raws) + b"]")  # type: ignore[arg-type]
            except (ValidationError, *BAD_INPUT_ERRORS):
                pass  # find the bad ones one by one
            else:
                # One entry's bytes can hold no event (b"") or two ('{..},{..}'): then the array
                # has another length than the batch and the entries are decoded one by one.
                if len(events) == len(raws):
                    return events, {}
        events: list[Any] = []
        bad: dict[int, str] = {}
        for i, raw in enumerate(raws):
            if raw is None:
                events.append(None)
                bad[i] = f"entry has no {DATA_FIELD} field"
                continue
            try:
                events.append(self.one(raw))
            except BAD_INPUT_ERRORS as exc:
                events.append(None)
                bad[i] = one_line(exc)
        return events, bad


def _kline_fast_path(model: type) -> Any:
    """For ``KlineEvent`` (klines.v1, the busiest topic): a batch decoded by the model's own
    pydantic schema without its Python validators (symbol, interval, 64-bit ints, the physical
    rules: ~60% of a decode), which are then checked here over the whole batch with the same
    rules. Returns a function giving the events, or None when any entry needs a closer look
    (then the batch takes the usual path, which finds and words each refusal exactly as
    before). None (no fast path) for any other model, or when KlineEvent's validators are not
    exactly the ones re-checked here."""
    from libs.common.contracts import Event, KlineEvent
    from libs.common.klines import INTERVAL_MS, validate_kline

    if model is not KlineEvent:
        return None
    expected = {"_physical", "_ints_fit_64_bits", "_upper_symbol", "_known_interval"}
    found: set[str] = set()

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "function-after":
                found.add(getattr(node["function"]["function"], "__name__", "?"))
                return strip(node["schema"])
            if str(node.get("type", "")).startswith("function-"):
                found.add("?")
            return {k: (strip(v) if k in ("schema", "fields", "items_schema") or isinstance(v, dict) and k not in ("metadata", "config", "default") else v)
                    for k, v in node.items() if k != "ref"}
        return node

    try:
        inner = strip(KlineEvent.__pydantic_core_schema__)
        if found != expected or inner.get("type") != "model" or inner.get("cls") is not KlineEvent:
            return None
        validator = SchemaValidator({"type": "list", "items_schema": inner})
    except Exception:  # noqa: BLE001 - an unexpected schema shape: no fast path
        return None
    int_fields = KlineEvent._int_fields
    if set(int_fields) - {"schema_version", "open_time", "close_time", "trades", "ingested_at"}:
        return None
    good_symbols: set[str] = set()
    lo, hi = -(1 << 63), (1 << 63) - 1
    assert issubclass(KlineEvent, Event)

    def decode(raws: Sequence[bytes]) -> list[Any] | None:
        try:
            events = validator.validate_json(b"[" + b",".join(raws) + b"]")  # type: ignore[arg-type]
        except (ValidationError, *BAD_INPUT_ERRORS):
            return None
        if len(events) != len(raws):
            return None
        for e in events:
            d = e.__dict__
            sym = d["symbol"]
            if sym not in good_symbols:
                if not (sym and sym == sym.upper() and sym.isalnum()):
                    return None
                if len(good_symbols) > 100_000:
                    good_symbols.clear()
                good_symbols.add(sym)
            if d["interval"] not in INTERVAL_MS:
                return None
            for name in int_fields:
                v = d[name]
                if not lo <= v <= hi:
                    return None
            try:
                validate_kline(e)
            except InvalidKline:
                return None
        return events

    return decode


def entry_id_key(entry_id: str | bytes) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a sortable pair: the one entry-id ordering of the project."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


# Redis's largest sequence number (an unsigned 64-bit integer).
MAX_ENTRY_SEQ = 2**64 - 1


def entry_id_before(entry_id: str | bytes) -> str:
    """The greatest possible entry id below ``entry_id`` ("0-0" for the lowest): a read "after"
    it starts at ``entry_id``, a reverse page "up to" it ends just below."""
    ms, seq = entry_id_key(entry_id)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_ENTRY_SEQ}" if ms else "0-0"


def payload_of(fields: dict | None) -> bytes | None:
    """The event of an entry as redis-py's parser gives it (``{field: value}``)."""
    return (fields or {}).get(DATA_FIELD_B)


def payload_of_fields(fields: list | None) -> bytes | None:
    """The event of an entry as the consumers read it (``[field, value, ...]``, or None for a
    pending entry the stream no longer holds)."""
    if not fields:
        return None
    if fields[0] == DATA_FIELD_B:
        return fields[1]
    for i in range(2, len(fields) - 1, 2):
        if fields[i] == DATA_FIELD_B:
            return fields[i + 1]
    return None


def encode(event: Any) -> bytes:
    to_json = getattr(event, "to_json", None)
    return to_json() if to_json is not None else orjson.dumps(event)
