"""Deciding who hears of an alert event, sending it, and remembering it.

* Alertmanager hears every firing (it de-duplicates by labels and wants active alerts re-sent, which
  ``tick`` does every ``resend_s``) and every resolve.
* Chat destinations (Discord, Slack, the generic webhook) hear when an alert starts, again every
  ``repeat_s`` while it lasts, and when it resolves (only if they heard it start).
* An event already delivered to a destination (a re-delivery, a retry after a crash) is not sent to
  it again; a destination that refuses it for good gets a dead letter instead; one that still fails
  after every try is recorded as owing it, and ``tick`` tries again every ``resend_s`` until it
  takes it (the event itself is acknowledged: one destination down never holds up the others)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any, Awaitable, Callable, Sequence

from libs.common.contracts import AlertEvent
from libs.common.klines import now_ms
from services.alerts.book import AlertBook, AlertState
from services.alerts.delivery import Destination, Outcome, Result
from services.alerts.notification import SOURCE_LABEL, Chart, Notification, at_least, fingerprint, labels_of

log = logging.getLogger("klinebus.alerts")
# Alertmanager keeps an alert active until its endsAt; we re-send every resend period with endsAt
# this many periods ahead (what Prometheus does), so a dead alerts service lets them resolve.
ENDS_AT_RESENDS = 4
_OWN_LABELS = {"alertname", "severity", "symbol", "interval", SOURCE_LABEL[0]}


def _context(st: AlertState) -> dict[str, Any]:
    d = st.doc
    ctx: dict[str, Any] = {"rule": d["rule"], "fingerprint": st.fingerprint, "status": st.status}
    for key in ("symbol", "interval", "open_time"):
        if d.get(key) is not None:
            ctx[key] = d[key]
    return ctx


def event_of(st: AlertState) -> AlertEvent:
    """The alert as an ``alerts.v1`` event again (for a dead letter written outside a handler)."""
    d = st.doc
    return AlertEvent(
        rule=d["rule"], severity=d["severity"], symbol=d.get("symbol"), interval=d.get("interval"),
        open_time=d.get("open_time"), message=d["message"], value=d.get("value"), threshold=d.get("threshold"),
        labels={k: v for k, v in d["labels"].items() if k not in _OWN_LABELS},
        fired_at=st.fired_at if st.status == "firing" else (st.resolved_at or st.fired_at), status=st.status,
    )


class Dispatcher:
    def __init__(
        self,
        book: AlertBook,
        destinations: Sequence[Destination],
        *,
        metrics: Any,
        dead_letter: Callable[[AlertEvent, str], Awaitable[None]],
        chart: Callable[[str, str], Awaitable[Chart | None]] | None = None,
        resend_ms: int = 60_000,
        repeat_ms: int = 4 * 3_600_000,
        generator_url: str = "",
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.book = book
        self.destinations = list(destinations)
        self.metrics = metrics
        self._dead_letter = dead_letter
        self._chart = chart
        self.resend_ms = resend_ms
        self.repeat_ms = repeat_ms
        self.generator_url = generator_url
        self.clock = clock

    # --- one event --------------------------------------------------------------------------

    async def handle(self, event: AlertEvent) -> list[tuple[str, Outcome]]:
        now = self.clock()
        labels = labels_of(event)
        fp = fingerprint(labels)
        self.metrics.received.labels(event.rule, event.severity, event.status).inc()
        async with self.book.locked(fp):
            if event.status == "firing":
                st, transition = await self.book.record_firing(event, labels, fp, now)
            else:
                st, transition = await self.book.record_resolved(event, labels, fp)
        plan = self._plan(st, transition, event, now)
        if not plan:
            log.debug("alert %s %s: nothing to send (%s)", event.rule, event.status, transition, extra=_context(st))
            return []
        n = await self._with_chart(self._notification(st, now), [d for d, _ in plan])
        results = await asyncio.gather(*(d.deliver(replace(n, repeat=repeat)) for d, repeat in plan))
        for (dest, _), result in zip(plan, results):
            await self._settle(st, dest, result, event, now)
        return [(dest.name, result.outcome) for (dest, _), result in zip(plan, results)]

    def _plan(self, st: AlertState, transition: str, event: AlertEvent, now: int) -> list[tuple[Destination, bool]]:
        plan: list[tuple[Destination, bool]] = []
        if transition == "stale":
            return plan
        for d in self.destinations:
            if event.status == "firing":
                if not at_least(event.severity, d.sink.min_severity):
                    continue
                delivered = st.sent.get(d.name, -1) >= event.fired_at
                if not d.sink.chat:
                    if not delivered:
                        plan.append((d, False))
                elif d.name not in st.notified:
                    plan.append((d, False))
                elif not delivered and now - st.notified[d.name] >= self.repeat_ms:
                    plan.append((d, True))
            elif d.name not in st.resolved_sent and (not d.sink.chat or d.name in st.notified):
                plan.append((d, False))
        return plan

    def _owes(self, st: AlertState, d: Destination) -> bool:
        """Whether ``d`` has yet to hear what the alert's current state calls for."""
        if st.status == "firing":
            if not at_least(st.doc["severity"], d.sink.min_severity):
                return False
            return d.name not in st.notified if d.sink.chat else st.sent.get(d.name, -1) < st.fired_at
        return d.name not in st.resolved_sent and (not d.sink.chat or d.name in st.notified)

    async def _with_chart(self, n: Notification, dests: Sequence[Destination]) -> Notification:
        if n.is_market and not n.resolved and self._chart and any(d.sink.wants_chart for d in dests):
            return n.with_chart(await self._chart(n.symbol, n.interval))  # type: ignore[arg-type]
        return n

    async def _settle(self, st: AlertState, dest: Destination, result: Result, event: AlertEvent | None, now: int) -> None:
        """Record one destination's outcome: delivered or refused for good (dead letter) settles it;
        still failing records the debt for the next tick."""
        ctx = {**_context(st), "sink": dest.name}
        self.metrics.notifications.labels(dest.name, result.outcome.value).inc()
        if result.outcome is Outcome.PENDING:
            log.warning("%s still fails (%s); alert %s %s owed, retried every %.0fs", dest.name, result.reason,
                        st.doc["rule"], st.status, self.resend_ms / 1000, extra=ctx)
            await self.book.owe(st.fingerprint, dest.name)
            return
        if result.outcome is Outcome.DEAD_LETTERED:
            log.error("%s refused alert %s for good: %s", dest.name, st.doc["rule"], result.reason, extra=ctx)
            await self._dead_letter(event or event_of(st), result.reason)
        else:
            fired = event.fired_at if event is not None else st.fired_at
            self.metrics.fired_to_delivered.labels(dest.name).observe(max(0.0, (self.clock() - fired) / 1000))
            log.info("alert %s %s sent to %s", st.doc["rule"], st.status, dest.name, extra=ctx)
        if st.status == "resolved":
            await self.book.mark(st.fingerprint, dest.name, resolved=True)
            st.resolved_sent.add(dest.name)
        else:
            fired_at = event.fired_at if event is not None else st.fired_at
            await self.book.mark(st.fingerprint, dest.name, fired_at=fired_at,
                                 notified_at=now if dest.sink.chat else None)
            st.sent[dest.name] = fired_at
            if dest.sink.chat:
                st.notified[dest.name] = now
        await self.book.settle(st.fingerprint, dest.name)

    def _notification(self, st: AlertState, now: int) -> Notification:
        d = st.doc
        if st.status == "resolved":
            ends_at = st.resolved_at
        else:
            ends_at = min(st.expires_at, now + ENDS_AT_RESENDS * self.resend_ms)
        return Notification(
            fingerprint=st.fingerprint, status=st.status, labels=dict(d["labels"]), rule=d["rule"],
            severity=d["severity"], message=d["message"], starts_at=st.starts_at, ends_at=ends_at,
            fired_at=st.fired_at if st.status == "firing" else (st.resolved_at or st.fired_at),
            symbol=d.get("symbol"), interval=d.get("interval"), open_time=d.get("open_time"),
            value=d.get("value"), threshold=d.get("threshold"), generator_url=self.generator_url,
        )

    # --- periodic: re-send active alerts, resolve expired ones, pay debts ------------------------

    async def tick(self) -> int:
        """Re-send every active alert to Alertmanager; resolve those past their max age; retry what
        destinations owe. Returns how many alerts are active."""
        now = self.clock()
        owed = await self.book.owed()  # before this tick adds its own
        active: list[Notification] = []
        for fp in await self.book.active():
            st = await self.book.load(fp)
            if st is None:
                await self.book.claim_expired(fp)
                continue
            if st.status == "firing" and st.expires_at <= now:
                if await self.book.claim_expired(fp):
                    await self.book.resolve(st, now)
                    log.info("alert %s not fired again for its max age; resolving it", st.doc["rule"], extra=_context(st))
                    await self._deliver_state(st, [d for d in self.destinations if self._owes(st, d)], now)
                continue
            active.append(self._notification(st, now))
        self.metrics.active.set(len(active))
        for dest in self.destinations:
            if dest.sink.chat or not active:
                continue
            result = await dest.call(lambda session, d=dest: d.sink.send_many(session, active), {"sink": dest.name})
            if result.outcome is not Outcome.DELIVERED:
                self.metrics.resend_failures.labels(dest.name).inc()
                log.warning("re-sending %d active alerts to %s failed: %s", len(active), dest.name, result.reason)
        await self._pay(owed, now)
        self.metrics.owed.set(len(await self.book.owed()))
        return len(active)

    async def _pay(self, owed: list[tuple[str, str]], now: int) -> None:
        by_name = {d.name: d for d in self.destinations}
        for fp, sink in owed:
            dest = by_name.get(sink)
            st = await self.book.load(fp)
            if dest is None or st is None or not self._owes(st, dest):
                await self.book.settle(fp, sink)  # paid meanwhile, expired, or a destination removed
                continue
            await self._deliver_state(st, [dest], now)

    async def _deliver_state(self, st: AlertState, dests: Sequence[Destination], now: int) -> None:
        if not dests:
            return
        n = await self._with_chart(self._notification(st, now), dests)
        for dest in dests:
            await self._settle(st, dest, await dest.deliver(n), None, now)
