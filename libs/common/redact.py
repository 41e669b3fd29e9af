"""One redaction helper for every boundary where text leaves a process.

Secrets reach a process as settings (Redis URLs with a password, webhook URLs whose path is the
token, API tokens). Anything the process writes where people or other systems read it (settings
errors, log lines, ``/metrics``, dead letters, ``klinebus tail``) goes through ``redact`` first.

Two layers, because neither alone is enough:

- **known secrets**: every value registered with ``register`` (settings do it when they load:
  each ``SecretStr``, the password of each Redis URL, the path of each webhook URL) is replaced
  wherever it appears, whatever the text around it;
- **shapes**: credentials in a URL (``scheme://user:password@``), Discord/Slack webhook paths,
  ``token=``/``password=``/``secret=`` query parameters and ``Authorization: Bearer`` values are
  replaced even when nobody registered them (a URL typed on a command line, one inside an error
  a library raised).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# A registered secret shorter than this is not replaced on its own (replacing "a" everywhere
# would destroy every message); its URL shape is still caught.
MIN_SECRET_LEN = 4

_lock = threading.Lock()
_known: list[str] = []  # longest first

# scheme://user:password@host  ->  scheme://user:***@host ; scheme://token@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^\s:/@'\"]*)(?::(?P<pw>[^\s/@'\"]*))?@")
_WEBHOOK_PATHS = re.compile(
    r"(?P<keep>(?:discord(?:app)?\.com/api/webhooks|hooks\.slack\.com/(?:services|workflows|triggers))/)"
    r"[^\s'\"<>?#]+",
    re.IGNORECASE,
)
_QUERY_SECRET = re.compile(
    r"(?P<keep>[?&;\s](?:access_token|token|api_key|apikey|key|secret|password|passwd|pwd|sig|signature)=)"
    r"[^&\s'\"#]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<keep>\b(?:Bearer|Basic|token)\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def register(*secrets: Any) -> None:
    """Remember secrets (strings, ``SecretStr``, URLs) so ``redact`` replaces them anywhere."""
    found: set[str] = set()
    for s in secrets:
        if s is None:
            continue
        value = s.get_secret_value() if hasattr(s, "get_secret_value") else str(s)
        found.update(_parts_of(value))
    found = {p for p in found if len(p) >= MIN_SECRET_LEN}
    if not found:
        return
    with _lock:
        merged = set(_known) | found
        _known[:] = sorted(merged, key=len, reverse=True)


def forget_all() -> None:
    """Drop every registered secret (tests)."""
    with _lock:
        _known.clear()


def _parts_of(value: str) -> set[str]:
    """A secret and the pieces of it that are secret on their own (a URL's password, its token path)."""
    parts = {value}
    if "," in value and "://" not in value:  # a keyring: <key-id>:<secret>[,...]
        for piece in value.split(","):
            parts.update(_parts_of(piece.strip()))
        return parts
    if ":" in value and "://" not in value:
        parts.add(value.split(":", 1)[1])  # <key-id>:<secret>: the secret alone
    if "://" in value:
        try:
            u = urlsplit(value)
        except ValueError:
            return parts
        if u.password:
            parts.add(u.password)
        elif u.username and u.scheme not in ("http", "https"):
            parts.add(u.username)  # redis://token@host: the user part is the credential
        if u.scheme in ("http", "https") and len(u.path) > 8:
            parts.add(u.path)  # webhook URLs: the path is the token
        if u.query:
            parts.add(u.query)
    return parts


def redact(text: Any) -> str:
    """``text`` with every known secret and every credential-shaped part replaced by ``***``."""
    if not isinstance(text, str):
        text = str(text)
    if not text:
        return text
    known = _known
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _USERINFO.sub(_userinfo, text)
        text = _WEBHOOK_PATHS.sub(lambda m: m.group("keep") + MASK, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m.group("keep") + MASK, text)
    text = _BEARER.sub(lambda m: m.group("keep") + MASK, text)
    return _HF_TOKEN.sub(MASK, text)


def _userinfo(m: re.Match[str]) -> str:
    user, pw = m.group("user"), m.group("pw")
    if pw is not None:
        return f"{m.group('scheme')}{user}:{MASK}@" if pw != MASK else m.group(0)
    if user in ("", MASK):
        return m.group(0)
    return f"{m.group('scheme')}{MASK}@"


def redact_url(url: str | None) -> str:
    """A URL fit to show: credentials masked (``redis://user:***@host:6379/0``)."""
    if not url:
        return url or ""
    try:
        u = urlsplit(url)
    except ValueError:
        return redact(url)
    if u.password is not None or (u.username and u.scheme not in ("http", "https")):
        host = u.hostname or ""
        if u.port:
            host = f"{host}:{u.port}"
        user = f"{u.username}:{MASK}" if u.password is not None else MASK
        u = u._replace(netloc=f"{user}@{host}")
        return redact(urlunsplit(u))
    return redact(url)


class RedactingFilter(logging.Filter):
    """Put on a log handler: the record's message and traceback are redacted before formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logged as it is
            msg = str(record.msg)
        record.msg, record.args = redact(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in list(vars(record).items()):
            if isinstance(value, str) and key not in ("msg", "exc_text", "name", "levelname", "pathname",
                                                       "filename", "module", "funcName", "processName",
                                                       "threadName", "taskName"):
                setattr(record, key, redact(value))
        return True


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter: the finished line is redacted too (extra fields that are not
    strings, e.g. a dict holding a URL, are only seen once formatted)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def iter_redacted(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        yield redact(line)
