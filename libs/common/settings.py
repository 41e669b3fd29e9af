"""Settings: environment variables with one prefix, ``KLINEBUS_``, read by pydantic-settings.

One object per service (``settings/<service>.py``), all sharing ``ServiceSettings``.
A wrong value stops the service at start with one line naming the variable,
what it got and what it wants; secrets come only from the environment.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode, urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from libs.common.redact import redact, redact_url, register

ENV_PREFIX = "KLINEBUS_"
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# KLINEBUS_REDIS_URL=embedded: start a private redis-server (development only; libs/common/redis_server.py)
EMBEDDED_REDIS = "embedded"


class SettingsError(ValueError):
    """A setting is wrong; the message is one line naming the variable."""


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    redis_url: str | None = Field(
        None,
        description="Redis (6.2+) or Redis Cluster URL (cluster: redis+cluster://host:port). Required to run a "
        "service: unset or empty stops it at start. `embedded` (development, tests, make demo): a private "
        "redis-server is started under data_dir.",
    )
    redis_tls_ca: Path | None = Field(
        None, description="With a rediss:// URL: the CA bundle (PEM) that signed the Redis server's certificate. "
        "Unset: the system's trust store.",
    )
    redis_tls_cert: Path | None = Field(None, description="Client certificate (PEM) when Redis asks for one (tls-auth-clients).")
    redis_tls_key: Path | None = Field(None, description="The client certificate's private key (PEM).")
    data_dir: Path = Field(Path("var"), description="Root folder for embedded Redis, archive, artifacts.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field("json", description="json (for log shippers) or text (for people).")
    http_port: int = Field(
        0, ge=0, le=65535, description="Port for /metrics, /healthz, /readyz; 0 picks a free one."
    )
    http_host: str = Field("0.0.0.0", description="Address the telemetry HTTP server binds.")
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        description="This replica's consumer name in each consumer group (pod name on Kubernetes).",
    )
    stream_maxlen: int = Field(
        200_000,
        gt=0,
        description="Approximate cap (XADD MAXLEN ~) on every topic stream. A features.v1 entry of all-v1 "
        "takes ~2 KB in Redis, so the default holds ~0.4 GB per topic: size Redis for it.",
    )
    dead_letter_maxlen: int = Field(100_000, gt=0, description="Cap on the dead-letter stream.")
    max_event_bytes: int = Field(
        1 << 20, ge=1024,
        description="Largest stream entry a consumer parses; a longer one is dead-lettered unparsed (bounded memory "
        "per message). Real events are a few KB.",
    )
    reclaim_idle_ms: int = Field(
        60_000, gt=0, description="Work queues (competing groups): an entry pending this long on another "
        "consumer (a dead replica's) is claimed by a live one (XPENDING IDLE + XCLAIM) and handled again. Ordered "
        "groups do not wait for it: a new owner claims every pending entry when it takes over."
    )
    stream_retention_ms: int = Field(
        0,
        ge=0,
        description="Time-based retention beside the entry cap: when > 0, candle-keyed publishes also trim "
        "their stream with XTRIM MINID ~ (now - this), so a stream holds at most stream_maxlen entries and "
        "at most this much time. 0: the entry cap only.",
    )
    owner_lease_ms: int = Field(
        5_000,
        ge=500,
        description="Ordered groups (candle topics) have one owner replica, by a Redis lease of this length "
        "renewed at a third of it; a standby replica takes over within about this long of the owner's death.",
    )
    partitions: int = Field(
        1,
        ge=1,
        le=1024,
        description="Partitions of the keyed topics (klines.v1, features.v1): each is one stream with its own "
        "ordered-group lease, balanced over the replicas of features and inference. One value for the whole "
        "deployment, recorded in Redis at the first start; a service started with another value refuses to start "
        "(docs/bus.md#changing-the-partition-count). 1: one stream per topic, one owner and hot standbys.",
    )
    stale_consumer_ms: int = Field(
        3_600_000,
        gt=0,
        description="A consumer idle this long with nothing pending is removed from its group (XGROUP DELCONSUMER).",
    )

    artifact_url: str = Field(
        "", description="Artefact root (chart PNGs) every service reads charts from: a folder or fsspec URL "
        "(s3://bucket/charts); default <data_dir>/charts. A chart uri outside it is refused (dead letter)."
    )
    max_chart_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest chart PNG a service reads; a larger one is refused."
    )
    control_keys: SecretStr | None = Field(
        None,
        description="Keyring for the signed control topics (models.v1, datasets.v1): <key-id>:<secret>[,...], "
        "secrets of 32+ characters, the first one signs, all verify (rotation). Unset: this service refuses "
        "every control event. Secret: from the environment only (docs/threat-model.md, Control topics).",
    )

    @field_validator("control_keys")
    @classmethod
    def _control_keys(cls, v: SecretStr | None) -> SecretStr | None:
        from libs.common.signing import Keyring

        Keyring.parse(v)  # KeyringError (a ValueError) names the entry, never the secret
        return v

    def artifact_root(self) -> str:
        return self.artifact_url or str((self.data_dir / "charts").resolve())

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        if v.strip().lower() == EMBEDDED_REDIS:
            return EMBEDDED_REDIS
        parsed = urlparse(v)
        if parsed.scheme not in REDIS_SCHEMES:
            raise ValueError(f"must be a URL with scheme {'/'.join(REDIS_SCHEMES)}, got {redact_url(v)!r}")
        if parsed.scheme != "unix" and not parsed.hostname:
            raise ValueError(f"has no host: {redact_url(v)!r}")
        return v

    @model_validator(mode="after")
    def _redis_tls(self) -> "ServiceSettings":
        """The TLS files ride on the URL as redis-py's query options, so every client (faststream's,
        the bus's own, ``klinebus tail``) connects the same way."""
        tls = {"ssl_ca_certs": self.redis_tls_ca, "ssl_certfile": self.redis_tls_cert, "ssl_keyfile": self.redis_tls_key}
        tls = {k: str(v) for k, v in tls.items() if v is not None}
        if tls and self.redis_url and "ssl_" not in urlparse(self.redis_url).query:
            if not urlparse(self.redis_url).scheme.startswith("rediss"):
                raise ValueError("KLINEBUS_REDIS_TLS_* needs a rediss:// KLINEBUS_REDIS_URL")
            sep = "&" if "?" in self.redis_url else "?"
            self.redis_url = self.redis_url + sep + urlencode(tls)
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"must be DEBUG/INFO/WARNING/ERROR/CRITICAL, got {v!r}")
        return v

    @field_validator("log_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in {"json", "text"}:
            raise ValueError(f"must be json or text, got {v!r}")
        return v


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build ``cls`` from the environment; a wrong value raises ``SettingsError`` with one line."""
    try:
        settings = cls(**overrides)  # type: ignore[arg-type]
    except PydanticSettingsError as exc:  # e.g. a list variable that is not valid JSON
        raise SettingsError(redact(f"invalid setting: {' '.join(str(exc).split())}")) from None
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", ENV_PREFIX)
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else "?"
            var = f"{prefix}{field}".upper()
            got = os.environ.get(var)
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            shown = f" (got {redact_url(got)!r})" if got is not None and repr(got) not in msg else ""
            if _is_secret(cls, field):
                shown = ""  # a secret (a webhook URL with its token) never reaches a log line
            lines.append(redact(f"{var}: {msg}{shown}"))
        raise SettingsError("invalid setting " + "; ".join(lines)) from None
    register_secrets(settings)
    return settings


def register_secrets(settings: BaseSettings) -> None:
    """Every secret a settings object holds (``SecretStr`` fields, a Redis URL's password) is
    redacted from logs, errors, metrics and dead letters from now on (``libs.common.redact``)."""
    for name, value in settings:
        if isinstance(value, SecretStr) or (name.endswith("_url") and isinstance(value, str) and "@" in value):
            register(value)
        elif isinstance(value, (list, tuple)) and name.endswith("_urls"):
            register(*(v for v in value if isinstance(v, str) and "@" in v))


def _is_secret(cls: type[BaseSettings], field: str) -> bool:
    info = cls.model_fields.get(field)
    return info is not None and "SecretStr" in str(info.annotation)


def parse_csv_list(v: object) -> object:
    """Accept ``A,B,C`` from an environment variable as well as a JSON list (``["A", "B"]``).

    Fields using it are declared ``Annotated[list[str], NoDecode]`` so pydantic-settings hands the
    raw string over instead of JSON-decoding it first (which fails on a bare comma list)."""
    if isinstance(v, str):
        if v.strip().startswith("["):
            return json.loads(v)  # a malformed list is a ValueError: one line naming the variable
        return [p.strip() for p in v.split(",") if p.strip()]
    return v
