"""Fuzzed inputs through the real decode paths (tests/fuzz/harness.py): mutations of recorded real
events and property-based (hypothesis) payloads, for every topic a service consumes and for the
exchange's websocket and REST answers. 0 crashes; every refused message dead-lettered or counted;
an oversized entry refused before parsing.

Budget: ``KLINEBUS_FUZZ_MESSAGES`` mutated messages in all (default 20,000: a few seconds, run
every time) and ``KLINEBUS_FUZZ_EXAMPLES`` hypothesis examples per property (default 200);
``make fuzz`` runs 100,000+ of each kind of surface."""

from __future__ import annotations

import json
import os
import random
import tracemalloc

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common import topics
from libs.common.bus.framing import MAX_EVENT_BYTES, Decoder, OversizedEvent
from libs.common.contracts import EVENT_TYPES
from tests.fuzz import harness
from tests.fuzz.samples import SAMPLES

MESSAGES = int(os.environ.get("KLINEBUS_FUZZ_MESSAGES", "20000"))
EXAMPLES = int(os.environ.get("KLINEBUS_FUZZ_EXAMPLES", "200"))
SEED = int(os.environ.get("KLINEBUS_FUZZ_SEED", "20261205"))
BATCH = 50

TARGETS = harness.targets()


def dumps(value) -> bytes:
    """JSON of anything hypothesis draws, big integers and infinities included (orjson refuses them)."""
    return json.dumps(value).encode()


def report(name: str, out: harness.Outcome) -> str:
    return f"{name}: {out.messages} messages, {out.decoded} decoded, {out.refused} refused, {len(out.crashes)} crashes"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutations_of_recorded_events_never_crash_a_decoder(name):
    make, seeds = TARGETS[name]
    target = make()
    rng = random.Random(f"{SEED}:{name}")
    out = harness.Outcome()
    per_target = max(200, MESSAGES // len(TARGETS))
    for seed in seeds:  # the seeds themselves are real, valid messages
        target.feed([seed], out)
    assert out.decoded >= 1 and not out.crashes, (report(name, out), out.crashes[:3])
    done = 0
    while done < per_target:
        batch = harness.mutants(seeds, rng, min(BATCH, per_target - done))
        target.feed(batch, out)
        done += len(batch)
    if hasattr(target, "close"):
        target.close()
    print(report(name, out))
    assert not out.crashes, f"{report(name, out)}; first: {out.crashes[:3]}"
    assert out.refused > 0  # the mutations did reach the refusal paths
    assert out.messages == out.decoded + out.refused  # nothing neither decoded nor refused


# --- property-based: any JSON, any shape of each model --------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


def shaped(topic: str):
    """Dicts with the model's field names (most kept from the real sample), values anything."""
    sample = SAMPLES[topic]
    fields = list(EVENT_TYPES[topic].model_fields)
    return st.fixed_dictionaries(
        {},
        optional={f: (st.just(sample[f]) | json_values) if f in sample else json_values for f in fields},
    )


bus_topics = sorted({t for _, t in harness.consumed()})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(topic=st.sampled_from(bus_topics), data=st.data())
def test_any_json_of_any_shape_on_a_consumed_topic_is_decoded_or_refused(topic, data):
    payload = data.draw(shaped(topic) | json_values)
    raw = dumps(payload)
    out = harness.Outcome()
    harness.BusTarget(topic).feed([raw, harness.bus_seeds(topic)[0]], out)
    assert not out.crashes, out.crashes
    assert out.decoded >= 1  # a bad neighbour never takes a good entry down with it


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=300) | json_values.map(dumps))
def test_any_bytes_on_any_consumed_topic_are_decoded_or_refused(raw):
    out = harness.Outcome()
    for topic in bus_topics:
        harness.BusTarget(topic).feed([raw], out)
    assert not out.crashes, out.crashes


ws_kline = st.fixed_dictionaries({
    "e": st.just("kline") | st.text(max_size=8),
    "E": st.integers() | json_values,
    "s": st.sampled_from(["BTCUSDT", "btcusdt", ""]) | json_values,
    "k": st.fixed_dictionaries({}, optional={
        k: json_values | st.just(v)
        for k, v in next(d for d in map(orjson.loads, harness.ws_seeds()) if "k" in d)["k"].items()
    }) | json_values,
})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(msg=ws_kline | st.fixed_dictionaries({"stream": st.text(max_size=20), "data": ws_kline}) | json_values)
def test_any_websocket_message_is_parsed_dead_lettered_or_counted(msg):
    target = harness.WsTarget()
    out = harness.Outcome()
    try:
        target.feed([dumps(msg)], out)
    finally:
        target.close()
    assert not out.crashes, out.crashes


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.lists(st.lists(json_values | st.text(max_size=12), max_size=13), max_size=5) | json_values)
def test_any_rest_klines_answer_is_parsed_or_refused(body):
    out = harness.Outcome()
    harness.RestTarget().feed([dumps(body)], out)
    assert not out.crashes, out.crashes


# --- bounded memory per message ------------------------------------------------------------------


def test_an_oversized_entry_is_refused_before_parsing_with_no_memory_beyond_its_bytes():
    huge = b'{"symbol":"BTCUSDT","values":{' + b",".join(b'"k%d":1.0' % i for i in range(400_000)) + b"}}"
    assert len(huge) > MAX_EVENT_BYTES
    decoder = Decoder(EVENT_TYPES[topics.FEATURES])
    good = orjson.dumps(SAMPLES[topics.FEATURES])
    tracemalloc.start()
    try:
        with pytest.raises(OversizedEvent):
            decoder.one(huge)
        events, bad = decoder.many([good, huge, good])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(bad) == {1} and "over the 1048576-byte cap" in bad[1]
    assert events[0] is not None and events[2] is not None
    # Parsing it would build 400,000 dict entries (tens of MB); refusing it allocates next to nothing.
    assert peak < 256 * 1024, peak


def test_the_cap_is_a_setting_the_bus_applies(monkeypatch):
    from libs.common.bus import Bus
    from libs.common.settings import ServiceSettings

    monkeypatch.setenv("KLINEBUS_MAX_EVENT_BYTES", "4096")
    s = ServiceSettings()
    bus = Bus.from_settings("features", s, "redis://127.0.0.1:1/0")
    assert bus.max_event_bytes == 4096
