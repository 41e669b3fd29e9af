"""The vlm's waiting room without Redis or a model: the desk's decisions (latest chart wins, one
chart at a time, what each outcome means) through in-memory ports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from libs.common.telemetry import ServiceMetrics
from libs.llm.runtime import BackendUnavailable
from services.vlm.analysis import Answer, PriceFrame
from services.vlm.analyst import Analysis
from services.vlm.desk import ChartUnusable, Desk, DeskMetrics

from .conftest import chart_event


class Room:
    """The waiting room's contract (``pending.PendingCharts``) in dicts: the latest chart per
    (symbol, interval), a lease per chart."""

    def __init__(self) -> None:
        self.charts: dict[str, tuple[int, bytes]] = {}
        self.leases: dict[tuple[str, int], str] = {}

    async def offer(self, symbol, interval, open_time, chart_json):
        field = f"{symbol}|{interval}"
        cur = self.charts.get(field)
        if cur is not None and cur[0] >= open_time:
            return False, cur[0]
        self.charts[field] = (open_time, chart_json)
        return True, (cur[0] if cur else None)

    async def waiting(self):
        return sorted(((f, t) for f, (t, _) in self.charts.items()), key=lambda kv: (kv[1], kv[0]))

    async def take(self, field, open_time, owner, lease_ms):
        if (field, open_time) in self.leases:
            return None
        cur = self.charts.get(field)
        if cur is None or cur[0] != open_time:
            return None
        self.leases[(field, open_time)] = owner
        return cur[1]

    async def release(self, field, open_time):
        self.leases.pop((field, open_time), None)

    async def release_owned(self, owner):
        mine = [k for k, v in self.leases.items() if v == owner]
        for k in mine:
            del self.leases[k]
        return len(mine)

    async def done(self, field, open_time):
        self.leases.pop((field, open_time), None)
        if self.charts.get(field, (None,))[0] == open_time:
            del self.charts[field]
            return True
        return False

    async def count(self):
        return len(self.charts)


class Port:
    def __init__(self, candles) -> None:
        self.candles = candles
        self.letters: list[str] = []
        self.published: list[tuple[str, int, str]] = []
        self.broken_frames = False

    async def frame_of(self, chart):
        if self.broken_frames:
            raise ZeroDivisionError("a bug")
        shown = [k for k in self.candles if chart.first_open_time <= k.open_time <= chart.open_time]
        if not shown or shown[-1].open_time != chart.open_time:
            raise ChartUnusable("the candles are not on klines.v1")
        return PriceFrame.of(shown)

    async def image_of(self, chart):
        return b"\x89PNG"

    async def dead_letter(self, raw, reason):
        self.letters.append(reason)

    async def publish(self, event, frame):
        self.published.append((event.symbol, event.open_time, event.signal))
        return True


class Analyst:
    """Answers ``buy``; raises what ``script`` says first (one item per call)."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls = 0

    async def analyse(self, chart, frame, png):
        self.calls += 1
        if self.script:
            raise self.script.pop(0)
        answer = Answer(trend="bullish", confidence=0.7, support=[frame.low], resistance=[frame.high], patterns=[],
                        signal="buy", summary="up")
        return Analysis(answer, attempts=1)


class Backend:
    model_name, revision, kind = "scripted.gguf", "r1", "remote"


def desk(port: Port, room: Room | None = None, **kw) -> tuple[Desk, list[bool]]:
    m = ServiceMetrics("vlm", CollectorRegistry())
    metrics = DeskMetrics(m.counter("skipped_total", "", ["why"]), m.counter("analyses_total", "", ["result"]),
                          m.counter("answer_retries_total", ""), m.counter("backend_errors_total", ""),
                          m.histogram("call_seconds", "", ["phase"]))
    health: list[bool] = []
    opts = dict(consumer="c", lease_ms=1000, presets=["analysis"], backend_attempts=3, backend_retry_s=0.0)
    return Desk(room or Room(), port, metrics, on_backend=health.append, **{**opts, **kw}), health


def charts(candles, *lasts, **kw):
    return [chart_event(candles, last, "file:///charts/x.png", **kw) for last in lasts]


async def test_the_latest_chart_wins_and_only_it_is_analysed(candles):
    port = Port(candles)
    d, health = desk(port)
    c57, c58, c59 = charts(candles, 57, 58, 59)
    thumbnail = c59.model_copy(update={"preset": "classifier224"})
    said = [await d.offer(c) for c in (c58, c59, c57, thumbnail)]
    assert said == ["recorded", "superseded", "stale", "preset"]
    assert await d.step(Analyst(), Backend()) is True
    assert await d.step(Analyst(), Backend()) is False  # nothing left
    assert port.published == [("BTCUSDT", c59.open_time, "buy")] and port.letters == [] and health == [True]


async def test_a_backend_that_is_down_gives_the_chart_back_until_its_tries_run_out(candles):
    port = Port(candles)
    room = Room()
    d, health = desk(port, room, backend_attempts=2)
    (c59,) = charts(candles, 59)
    await d.offer(c59)
    down = Analyst(BackendUnavailable("connection refused"), BackendUnavailable("connection refused"))
    assert await d.step(down, Backend())
    assert await room.count() == 1 and room.leases == {}  # waiting again, for anyone
    assert await d.step(down, Backend())
    assert await room.count() == 0
    assert port.letters == ["vlm backend_down: connection refused"] and port.published == []
    assert health == [False, False]
    # the next chart finds the backend back
    (c58,) = charts(candles, 58, symbol="ETHUSDT")
    await d.offer(c58)
    assert await d.step(Analyst(BackendUnavailable("once")), Backend())
    assert await d.step(Analyst(), Backend())
    assert port.published == [("ETHUSDT", c58.open_time, "buy")] and health[-2:] == [False, True]


async def test_each_unusable_chart_is_its_own_dead_letter_and_the_desk_goes_on(candles):
    port = Port(candles)
    d, _ = desk(port)
    (missing,) = charts(candles, 59)
    port.candles = candles[:50]  # its candles are not on klines.v1
    await d.offer(missing)
    assert await d.step(Analyst(), Backend())
    port.candles = candles
    port.broken_frames = True  # a bug while reading the next one
    (other,) = charts(candles, 59, symbol="SOLUSDT")
    await d.offer(other)
    assert await d.step(Analyst(), Backend())
    port.broken_frames = False
    (good,) = charts(candles, 59, symbol="XRPUSDT")
    await d.offer(good)
    assert await d.step(Analyst(), Backend())
    assert port.letters == ["vlm unusable_chart: the candles are not on klines.v1",
                            "vlm error: ZeroDivisionError: a bug"]
    assert port.published == [("XRPUSDT", good.open_time, "buy")]


async def test_a_restarted_replica_gives_back_the_charts_its_name_held(candles):
    room = Room()
    d, _ = desk(Port(candles), room)
    (c59,) = charts(candles, 59)
    await d.offer(c59)
    assert await room.take("BTCUSDT|15m", c59.open_time, "c", 1000) is not None  # held when it was killed
    assert await d.start() == 1
    assert room.leases == {} and await room.count() == 1
