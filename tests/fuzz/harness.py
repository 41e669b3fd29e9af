"""What the fuzz tests drive: every decode path an outside message reaches, the way the services
call it, and the rule each must keep.

Targets (one per input surface):

* ``bus:<service>:<topic>``: the bus's decode of a stream entry for every topic a service consumes
  (``libs.common.bus.framing.Decoder`` over the contract model, in a batch and alone, with the
  per-entry size cap the consumer applies), then the services' own checks where they have one
  (control-topic signatures, the chart uri's artefact root, alert labels, candle physics);
* ``ws``: the ingest engine's websocket message handler (``IngestEngine.on_message``: JSON,
  control replies, ``parse_ws_kline``, the event time), and ``wsclient.is_server_shutdown``;
* ``rest``: the ingest REST client's row parsing (``rest._closed_rows`` over a decoded body).

The rule: a message either decodes, or is refused with one of the documented bad-input errors
(and then dead-lettered or counted, which the target records); anything else is a crash.
"""

from __future__ import annotations

import asyncio
import gzip
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import orjson

from libs.common import topics
from libs.common.bus.framing import BAD_INPUT_ERRORS, DATA_FIELD_B, Decoder, payload_of_fields
from libs.common.contracts import EVENT_TYPES, InvalidEvent, KlineEvent
from libs.common.klines import InvalidKline, parse_ws_kline, read_kline_csv
from tests.fuzz.samples import SAMPLES

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "binance"
FUZZ_CAP = 64 * 1024  # the decoders' size cap in the fuzz (the default is 1 MiB; smaller finds the edge sooner)


class Crash(AssertionError):
    pass


class Outcome:
    """Counts per target: decoded, refused (with the reason kept as dead letter / counter would)."""

    def __init__(self) -> None:
        self.messages = 0
        self.decoded = 0
        self.refused = 0
        self.crashes: list[tuple[str, bytes, str]] = []

    def crash(self, target: str, raw: bytes, exc: BaseException) -> None:
        self.crashes.append((target, raw[:300], f"{type(exc).__name__}: {exc}"[:300]))


# --- the bus: every consumed topic ---------------------------------------------------------------


def consumed() -> list[tuple[str, str]]:
    return [(s, t) for s, a in topics.ACCESS.items() for t in a.consumes]


class BusTarget:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.decoder = Decoder(EVENT_TYPES[topic], max_bytes=FUZZ_CAP)

    def feed(self, raws: list[bytes], out: Outcome) -> None:
        """One batch, as the consumer hands it over: the fields list of each entry, its payload, the batch decode."""
        entries = [[DATA_FIELD_B, r] for r in raws]
        payloads = [payload_of_fields(f) for f in entries]
        try:
            events, bad = self.decoder.many(payloads)
        except Exception as exc:  # noqa: BLE001 - what we are looking for
            for r in raws:
                out.messages += 1
                out.crash(f"bus:{self.topic}", r, exc)
            return
        for i, r in enumerate(raws):
            out.messages += 1
            if i in bad:
                if not isinstance(bad[i], str) or not bad[i] or "\n" in bad[i] or events[i] is not None:
                    out.crash(f"bus:{self.topic}", r, AssertionError(f"bad reason {bad[i]!r}"))
                out.refused += 1
            else:
                ev = events[i]
                try:
                    ev.to_json()  # what a handler republishes or a dead letter quotes
                    _after_decode(self.topic, ev)
                except BAD_INPUT_ERRORS:
                    out.refused += 1
                    continue
                except Exception as exc:  # noqa: BLE001
                    out.crash(f"bus:{self.topic}", r, exc)
                    continue
                out.decoded += 1


class _Domain:
    """The services' own checks on a decoded event, built once: the control-topic signature check
    (inference, trainer), the artefact root a chart uri must lie under (inference, vlm, alerts),
    the alert labels and fingerprint (alerts)."""

    def __init__(self) -> None:
        import tempfile

        from prometheus_client import CollectorRegistry

        from libs.common.artefacts import ArtefactRoot
        from libs.common.signing import ControlGuard, Keyring
        from libs.common.telemetry import ServiceMetrics

        async def dead_letter(source: str, raw: Any, reason: str) -> None:
            return None

        metrics = ServiceMetrics("fuzz", CollectorRegistry())
        self.guard = ControlGuard(Keyring.parse("fuzz-key:" + "k" * 40), metrics, dead_letter)
        folder = Path(tempfile.mkdtemp(prefix="klinebus-fuzz-charts-"))
        self.root = ArtefactRoot(str(folder), max_bytes=1024, metrics=metrics)
        self.chart = folder / "BTCUSDT-1m.png"
        self.chart.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # the signature is what is checked


_domain: _Domain | None = None


def domain() -> _Domain:
    global _domain
    if _domain is None:
        _domain = _Domain()
    return _domain


def _after_decode(topic: str, ev: Any) -> None:
    """The checks services make on a decoded event before using it (domain decode). Raises a
    bad-input error (or a domain refusal, a ``ValueError``) for what the service refuses."""
    _domain = domain()
    if topic in (topics.KLINES, topics.KLINES_LIVE):
        ev.to_kline()
    elif topic in (topics.MODELS, topics.DATASETS):
        problem = _domain.guard.check(topic, ev)
        if problem is not None:
            raise InvalidEvent(str(problem))
    elif topic == topics.CHARTS:
        from libs.common.artefacts import ArtefactRefused

        try:
            _domain.root.read_png(ev.uri)
        except ArtefactRefused as exc:
            raise InvalidEvent(str(exc)) from None
    elif topic == topics.ALERTS:
        from services.alerts.notification import fingerprint, labels_of

        fingerprint(labels_of(ev))


# --- ingest: websocket and REST ------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def labels(self, *names: str) -> "_Counter":
        self._last = names
        return self

    def inc(self, n: int = 1) -> None:
        self.counts[self._last[0]] = self.counts.get(self._last[0], 0) + n


class WsTarget:
    """``IngestEngine.on_message`` on a stand-in engine (no trackers: the parse path only)."""

    def __init__(self) -> None:
        from services.ingest.engine import IngestEngine
        from services.ingest.wsclient import is_server_shutdown

        self._on_message = IngestEngine.on_message
        self._shutdown = is_server_shutdown
        self.letters: list[str] = []
        self.ws_messages = _Counter()

        async def dead_letter(source: str, raw: Any, reason: str) -> None:
            self.letters.append(reason)

        self.engine = SimpleNamespace(
            messages=0, metrics=SimpleNamespace(ws_messages=self.ws_messages),
            minute=SimpleNamespace(add=lambda **kw: None), dead_letter=dead_letter, trackers={},
            exchange_now=0, publish_live=False, _check_silence=lambda: None,
        )
        self.loop = asyncio.new_event_loop()

    def feed(self, raws: list[bytes], out: Outcome) -> None:
        for r in raws:
            out.messages += 1
            before_letters = len(self.letters)
            before_counted = sum(self.ws_messages.counts.values())
            try:
                self._shutdown(r)
                self.loop.run_until_complete(self._on_message(self.engine, r))
                _publishable(r)
            except Exception as exc:  # noqa: BLE001
                out.crash("ws", r, exc)
                continue
            counted = sum(self.ws_messages.counts.values()) - before_counted
            if len(self.letters) > before_letters:
                out.refused += 1
                if "\n" in self.letters[-1] or counted != 1:
                    out.crash("ws", r, AssertionError(f"letter {self.letters[-1]!r}, counted {counted}"))
            elif counted == 1:
                out.decoded += 1  # a kline, a control reply or an exchange error: each counted
            else:
                out.crash("ws", r, AssertionError("neither dead-lettered nor counted"))

    def close(self) -> None:
        self.loop.close()


def _publishable(raw: bytes) -> None:
    """A websocket kline that parses must become a klines.v1 event ingest can write."""
    try:
        k = parse_ws_kline(raw)
    except InvalidKline:
        return
    if k.closed:
        KlineEvent.from_kline(k, "ws").to_json()


class RestTarget:
    """The REST client's parse of a ``/api/v3/klines`` body (decoded JSON -> valid closed klines)."""

    def __init__(self) -> None:
        from services.ingest.rest import _closed_rows

        self._rows = _closed_rows

    def feed(self, raws: list[bytes], out: Outcome) -> None:
        for r in raws:
            out.messages += 1
            try:
                body = orjson.loads(r)
            except orjson.JSONDecodeError:
                out.refused += 1  # httpx's .json() raises the same way; the client counts and retries
                continue
            try:
                if not isinstance(body, list):
                    raise InvalidKline("klines answer is not a list")  # what the client checks first
                rows = self._rows(body, "BTCUSDT", "1m", 1 << 62)
                for k in rows:  # what the engine publishes next
                    KlineEvent.from_kline(k, "rest").to_json()
            except BAD_INPUT_ERRORS:
                out.refused += 1
                continue
            except Exception as exc:  # noqa: BLE001
                out.crash("rest", r, exc)
                continue
            out.decoded += 1 if rows else 0
            out.refused += 0 if rows else 1


# --- seeds: recorded real events ------------------------------------------------------------------


def real_klines(n: int = 200) -> list[bytes]:
    path = next((REPO / "data" / "klines").glob("BTCUSDT-1m-*.csv.gz"))
    return [KlineEvent.from_kline(k).to_json() for k in read_kline_csv(path)[:n]]


def ws_seeds() -> list[bytes]:
    out: list[bytes] = []
    for p in sorted(FIXTURES.glob("ws_*")):
        text = p.read_bytes()
        if p.suffix == ".jsonl":
            out += [ln for ln in text.splitlines() if ln.strip()]
        else:
            doc = orjson.loads(text)
            out += [orjson.dumps(d) for d in (doc if isinstance(doc, list) else [doc])]
    out.append(b'{"result":null,"id":1}')
    out.append(b'{"error":{"code":2,"msg":"Invalid request"},"id":3}')
    out.append(b'{"e":"serverShutdown","E":1700000000000}')
    return out


def rest_seeds() -> list[bytes]:
    rows = orjson.loads((FIXTURES / "rest_klines_docs_example.json").read_bytes())
    path = next((REPO / "data" / "klines").glob("BTCUSDT-1m-*.csv.gz"))
    with gzip.open(path, "rt") as f:
        csv_rows = [ln.strip().split(",") for ln in f.readlines()[1:40]]
    return [orjson.dumps(rows), orjson.dumps(csv_rows), orjson.dumps([r[:7] for r in csv_rows])]


def bus_seeds(topic: str) -> list[bytes]:
    """The topic's real-shaped event, made to pass the services' checks (signed, a chart that exists)."""
    doc = dict(SAMPLES[topic])
    if topic == topics.CHARTS:
        doc["uri"] = domain().chart.as_uri()
    if topic in (topics.MODELS, topics.DATASETS):
        doc = domain().guard.sign(topic, EVENT_TYPES[topic].model_validate(doc)).model_dump(mode="json")
    seeds = [orjson.dumps(doc)]
    if topic in (topics.KLINES, topics.KLINES_LIVE):
        seeds += real_klines(50)
    return seeds


# --- mutations ----------------------------------------------------------------------------------

_WEIRD_VALUES: list[Any] = [
    None, True, 0, -1, 1 << 64, -(1 << 63) - 1, 1e308, -1e308, 5e-324, "", "x" * 5000, "NaN", "Infinity",
    "1e999", "\u0000", "\ud7ff\ue000", "🚀", [], {}, [[[[[]]]]], {"a": {"b": {"c": None}}}, 0.1, "BTCUSDT",
    "btcusdt", "1m", "15m", "2m", 9_999_999_999_999_999, "-0", -0.0,
]


def _mutate_json(doc: Any, rng: random.Random, depth: int = 0) -> Any:
    if isinstance(doc, dict) and doc:
        doc = dict(doc)
        key = rng.choice(list(doc))
        roll = rng.random()
        if roll < 0.15:
            del doc[key]
        elif roll < 0.25:
            doc[rng.choice(["", "extra", key.upper(), "__proto__", "x" * 200])] = rng.choice(_WEIRD_VALUES)
        elif roll < 0.55 and depth < 4:
            doc[key] = _mutate_json(doc[key], rng, depth + 1)
        else:
            doc[key] = rng.choice(_WEIRD_VALUES)
        return doc
    if isinstance(doc, list) and doc:
        doc = list(doc)
        i = rng.randrange(len(doc))
        roll = rng.random()
        if roll < 0.2:
            del doc[i]
        elif roll < 0.3:
            doc.append(rng.choice(_WEIRD_VALUES))
        elif roll < 0.6 and depth < 4:
            doc[i] = _mutate_json(doc[i], rng, depth + 1)
        else:
            doc[i] = rng.choice(_WEIRD_VALUES)
        return doc
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return rng.choice([doc * -1, doc + 1, doc * 1e6, str(doc), int(doc) if doc == doc and abs(doc) < 1e300 else 0, 1e308])
    if isinstance(doc, str):
        return rng.choice([doc.lower(), doc * 50, doc[: len(doc) // 2], doc + "\u0000", "", " " + doc])
    return rng.choice(_WEIRD_VALUES)


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    roll = rng.random()
    if not b:
        return bytes([rng.randrange(256)])
    if roll < 0.25:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif roll < 0.4:
        return bytes(b[: rng.randrange(len(b))])
    elif roll < 0.55:
        i = rng.randrange(len(b))
        return bytes(b[:i]) + rng.choice([b"{", b"[", b'"', b"\\", b"\xff\xfe", b"\x00", b"1e999", b"-"]) + bytes(b[i:])
    elif roll < 0.65:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        return bytes(b[:j]) + bytes(b[i:j]) * rng.randint(1, 20) + bytes(b[j:])
    elif roll < 0.72:
        depth = rng.choice([10, 100, 1000, 100_000])
        return b"[" * depth + b"]" * depth
    elif roll < 0.76:
        return raw + b" " * rng.choice([10, FUZZ_CAP])  # over the cap by whitespace only
    elif roll < 0.8:
        return b"\xef\xbb\xbf" + raw  # a BOM
    return bytes(b)


def mutants(seeds: list[bytes], rng: random.Random, n: int) -> list[bytes]:
    docs = []
    for s in seeds:
        try:
            docs.append(orjson.loads(s))
        except orjson.JSONDecodeError:
            docs.append(None)
    out = []
    for _ in range(n):
        i = rng.randrange(len(seeds))
        if docs[i] is not None and rng.random() < 0.6:
            doc = docs[i]
            for _ in range(rng.randint(1, 3)):
                doc = _mutate_json(doc, rng)
            try:
                raw = orjson.dumps(doc)
            except (TypeError, orjson.JSONEncodeError):
                raw = seeds[i]
            if rng.random() < 0.2:
                raw = _mutate_bytes(raw, rng)
        else:
            raw = _mutate_bytes(seeds[i], rng)
        out.append(raw)
    return out


def targets() -> dict[str, tuple[Callable[[], Any], list[bytes]]]:
    """name -> (make the target, its seeds)."""
    out: dict[str, tuple[Callable[[], Any], list[bytes]]] = {}
    for service, topic in consumed():
        out[f"bus:{service}:{topic}"] = (lambda topic=topic: BusTarget(topic), bus_seeds(topic))
    out["ws"] = (WsTarget, ws_seeds())
    out["rest"] = (RestTarget, rest_seeds())
    return out
