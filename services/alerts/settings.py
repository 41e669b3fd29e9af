"""Settings of the alerts service. Webhook URLs carry their credentials (Discord's and Slack's
tokens are part of the path), so they are secrets: read only from the environment, held as
``SecretStr`` (never in a repr or an error line) and never logged."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from libs.common import topics
from libs.common.settings import ServiceSettings, parse_csv_list

Severity = Literal["info", "warning", "critical"]


def _http_url(v: str, what: str) -> str:
    parsed = urlparse(v)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    return v


class AlertsSettings(ServiceSettings):
    # --- destinations --------------------------------------------------------------------------
    alertmanager_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Alertmanager base URLs (comma-separated, e.g. http://alertmanager:9093); every one "
        "receives every alert, as Prometheus sends to each member of an HA pair.",
    )
    discord_webhook_url: SecretStr | None = Field(
        None, description="Discord webhook URL (a secret: it holds the token). Unset: no Discord."
    )
    slack_webhook_url: SecretStr | None = Field(
        None, description="Slack incoming-webhook URL (a secret). Unset: no Slack."
    )
    webhook_url: SecretStr | None = Field(
        None, description="Generic JSON webhook (Alertmanager's webhook payload, version 4). Unset: none."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="If set, the generic webhook's body is signed: X-Klinebus-Signature-256: sha256=<hmac>."
    )
    discord_min_severity: Severity = Field("info", description="Least severity sent to Discord.")
    slack_min_severity: Severity = Field("info", description="Least severity sent to Slack.")
    webhook_min_severity: Severity = Field("info", description="Least severity sent to the generic webhook.")
    generator_url: str = Field(
        "", description="Link put in each alert (Alertmanager generatorURL, chat messages): e.g. a Grafana URL."
    )

    # --- lifecycle of an alert -----------------------------------------------------------------
    resend_s: float = Field(
        60.0, gt=0,
        description="Active alerts are re-sent to Alertmanager this often (Alertmanager expects clients to "
        "re-send while active); each carries endsAt = now + 4 x this, so Alertmanager resolves them by "
        "itself if this service dies.",
    )
    repeat_s: float = Field(
        4 * 3600.0, gt=0, description="A still-active alert is repeated in chat (Discord, Slack, webhook) this often."
    )
    max_age_s: float = Field(
        24 * 3600.0, gt=0,
        description="An alert neither fired again nor resolved for this long resolves by itself (a lost "
        "resolve never leaves an alert firing forever).",
    )

    # --- delivery ------------------------------------------------------------------------------
    attempts: int = Field(
        6, ge=1, le=50, description="Tries per destination before it owes the notification (paid every resend_s)."
    )
    retry_initial_s: float = Field(1.0, gt=0, description="First retry delay; doubles each try (with jitter).")
    retry_max_s: float = Field(60.0, gt=0, description="Longest retry delay.")
    max_retry_after_s: float = Field(
        300.0, gt=0, description="A 429's retry_after longer than this is not waited in place: the notification "
        "is owed and paid at a later tick."
    )
    request_timeout_s: float = Field(10.0, gt=0, description="Timeout of one HTTP request to a destination.")
    alertmanager_per_minute: float = Field(0.0, ge=0, description="Rate limit to each Alertmanager; 0: none.")
    discord_per_minute: float = Field(
        30.0, ge=0, description="Rate limit to the Discord webhook (Discord allows ~30 messages/min per channel)."
    )
    slack_per_minute: float = Field(
        60.0, ge=0, description="Rate limit to the Slack webhook (Slack: about one message per second)."
    )
    webhook_per_minute: float = Field(600.0, ge=0, description="Rate limit to the generic webhook; 0: none.")

    # --- charts for market alerts --------------------------------------------------------------
    chart_lookup_entries: int = Field(
        2000, ge=0, description="How far back on charts.v1 to look for the latest chart of an alert's symbol; 0: never."
    )

    # --- the stream watcher --------------------------------------------------------------------
    watch_topics: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [topics.KLINES, topics.FEATURES, topics.PREDICTIONS, topics.CHARTS],
        description="Candle-keyed topics whose freshness and close-to-publish lag are measured (comma list; "
        "empty: no watcher).",
    )
    watch_every_s: float = Field(2.0, gt=0, description="Seconds between reads of the watched topics.")
    watch_history: int = Field(
        5000, ge=0, description="Entries read back per watched topic at start to learn each stream's last candle."
    )

    @field_validator("alertmanager_urls", "watch_topics", mode="before")
    @classmethod
    def _csv(cls, v: object) -> object:
        return parse_csv_list(v)

    @field_validator("alertmanager_urls")
    @classmethod
    def _am_urls(cls, v: list[str]) -> list[str]:
        return [_http_url(u.rstrip("/"), "each Alertmanager URL") for u in v]

    @field_validator("watch_topics")
    @classmethod
    def _watch(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in topics.ALL_TOPICS]
        if unknown:
            raise ValueError(f"unknown topics {unknown}; known: {', '.join(topics.ALL_TOPICS)}")
        return v

    @field_validator("discord_webhook_url", "slack_webhook_url", "webhook_url")
    @classmethod
    def _secret_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        _http_url(v.get_secret_value(), "a webhook URL")  # the message never repeats the URL
        return v
