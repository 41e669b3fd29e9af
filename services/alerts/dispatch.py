"""Deciding who hears of an alert event, sending it, and remembering it.

* Alertmanager hears every firing (it de-duplicates by labels and wants active alerts re-sent, which
  ``tick`` does every ``resend_s``) and every resolve.
* Chat destinations (Discord, Slack, the generic webhook) hear when an alert starts, again every
  ``repeat_s`` while it lasts, and when it resolves (only if they heard it start).
* An event already delivered to a destination (a re-delivery, a retry after a crash) is not sent to
  it again; a destination that refuses it for good gets a dead letter instead; one that keeps
  failing leaves the event pending (``DeliveryPending``), to be retried when it is reclaimed."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any, Awaitable, Callable, Sequence

from libs.common.contracts import AlertEvent
from libs.common.klines import now_ms
from services.alerts.book import AlertBook, AlertState
from services.alerts.delivery import Destination, Outcome
from services.alerts.notification import Chart, Notification, at_least, fingerprint, labels_of

log = logging.getLogger("klinebus.alerts")
# Alertmanager keeps an alert active until its endsAt; we re-send every resend period with endsAt
# this many periods ahead (what Prometheus does), so a dead alerts service lets them resolve.
ENDS_AT_RESENDS = 4


class DeliveryPending(RuntimeError):
    """Some destination still fails after every try: the entry stays pending and is retried."""


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
        ctx = {"rule": event.rule, "fingerprint": fp, "status": event.status, "transition": transition,
               **({"symbol": event.symbol} if event.symbol else {}),
               **({"interval": event.interval} if event.interval else {}),
               **({"open_time": event.open_time} if event.open_time is not None else {})}
        if not plan:
            log.debug("alert %s %s: nothing to send (%s)", event.rule, event.status, transition, extra=ctx)
            return []
        n = self._notification(st, now)
        if n.is_market and not n.resolved and self._chart and any(d.sink.wants_chart for d, _ in plan):
            n = n.with_chart(await self._chart(n.symbol, n.interval))  # type: ignore[arg-type]
        results = await asyncio.gather(*(d.deliver(replace(n, repeat=repeat)) for d, repeat in plan))
        pending, out = [], []
        for (dest, _), result in zip(plan, results):
            self.metrics.notifications.labels(dest.name, result.outcome.value).inc()
            out.append((dest.name, result.outcome))
            if result.outcome is Outcome.PENDING:
                pending.append(result.reason)
                continue
            if result.outcome is Outcome.DEAD_LETTERED:
                log.error("%s refused alert %s for good: %s", dest.name, event.rule, result.reason,
                          extra={**ctx, "sink": dest.name})
                await self._dead_letter(event, result.reason)
            else:
                self.metrics.fired_to_delivered.labels(dest.name).observe(max(0.0, (self.clock() - event.fired_at) / 1000))
                log.info("alert %s %s sent to %s", event.rule, event.status, dest.name, extra={**ctx, "sink": dest.name})
            await self._mark(st, dest, event.fired_at, now)
        if pending:
            raise DeliveryPending("; ".join(pending))
        return out

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

    async def _mark(self, st: AlertState, dest: Destination, fired_at: int, now: int) -> None:
        if st.status == "resolved":
            await self.book.mark(st.fingerprint, dest.name, resolved=True)
        else:
            await self.book.mark(st.fingerprint, dest.name, fired_at=fired_at,
                                 notified_at=now if dest.sink.chat else None)

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

    # --- periodic: re-send active alerts, resolve expired ones ---------------------------------

    async def tick(self) -> int:
        """Re-send every active alert to Alertmanager; resolve those past their max age. Returns
        how many are active."""
        now = self.clock()
        active: list[Notification] = []
        missed = await self.book.resolving()  # before this tick adds its own
        for fp in await self.book.active():
            st = await self.book.load(fp)
            if st is None:
                await self.book.claim_expired(fp)
                continue
            if st.status == "firing" and st.expires_at <= now:
                if await self.book.claim_expired(fp):
                    await self.book.resolve(st, now)
                    log.info("alert %s not fired again for its max age; resolving it", st.doc["rule"],
                             extra={"rule": st.doc["rule"], "fingerprint": fp})
                    await self._send_resolve(st, now)
                continue
            active.append(self._notification(st, now))
        for fp in missed:  # expiry resolves a destination has not taken yet
            st = await self.book.load(fp)
            if st is None or st.status != "resolved":
                await self.book.set_resolving(fp, False)
            else:
                await self._send_resolve(st, now)
        self.metrics.active.set(len(active))
        for dest in self.destinations:
            if dest.sink.chat or not active:
                continue
            result = await dest.call(lambda session, d=dest: d.sink.send_many(session, active), {"sink": dest.name})
            if result.outcome is not Outcome.DELIVERED:
                self.metrics.resend_failures.labels(dest.name).inc()
                log.warning("re-sending %d active alerts to %s failed: %s", len(active), dest.name, result.reason)
        return len(active)

    async def _send_resolve(self, st: AlertState, now: int) -> None:
        """The resolve of an expired alert to every destination that heard it and has not taken
        the resolve yet; one still failing keeps the alert in the resolving set for the next tick."""
        n = self._notification(st, now)
        pending = False
        for dest in self.destinations:
            if dest.name in st.resolved_sent or (dest.sink.chat and dest.name not in st.notified):
                continue
            result = await dest.deliver(n)
            self.metrics.notifications.labels(dest.name, result.outcome.value).inc()
            if result.outcome is Outcome.PENDING:
                pending = True
                continue
            await self.book.mark(st.fingerprint, dest.name, resolved=True)
            st.resolved_sent.add(dest.name)
        await self.book.set_resolving(st.fingerprint, pending)
