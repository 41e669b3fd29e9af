"""The Redis ACL file: one user per service, generated from ``libs.common.topics.ACCESS``.

Each service connects as ``klinebus-<service>`` and may

* append (XADD, and the dedupe hash beside the stream) only to the topics it produces, and
  ``dead-letters.v1``;
* use consumer groups (XREADGROUP, XACK, XCLAIM, XAUTOCLAIM, XPENDING, XGROUP CREATE /
  DELCONSUMER) only on the topics it consumes, with its group's position and fence keys;
* take and renew its own owner lease (``klinebus:owner:<service>``);
* read and write its own state keys (``topics.Access.state``);
* read (XRANGE, XREVRANGE, XREAD, XINFO, XLEN) any topic stream and its ``last-open-time`` hash;
* nothing else: no FLUSHALL, CONFIG, KEYS, DEBUG, no key outside these patterns, no pub/sub.

It needs Redis 7.0 or later: ACL *selectors* (``(...)``, one set of commands bound to one set of
keys) are what let a user read a stream through its group without being able to append to it.
Redis 6.2's ACL has one key pattern list per user shared by every command it may run, so a user
that may XREADGROUP a stream may also XADD to it; on 6.2 this file is refused (and the embedded
development server, which needs no users, keeps working without one).

Why commands are grouped the way they are: a script (EVALSHA) is allowed only when one selector
covers all of the keys it declares, and each ``redis.call`` inside it is checked again with the
caller's permissions; so each selector lists the keys of one script (a stream with its group's
position and fence keys; a stream with its dedupe hash) and the commands that script runs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping

from libs.common import topics
from libs.common.bus.guard import LAST_OPEN_TIME

USER_PREFIX = "klinebus-"
ADMIN_USER = "klinebus-admin"
MIN_REDIS_VERSION = (7, 0)

# Commands with no key that every client issues: connection set-up (HELLO, CLIENT SETNAME; redis-py's
# CLIENT SETINFO is left out: Redis 7.0 does not know it and refuses the file, and redis-py ignores
# its refusal), transactions (the fenced read is WATCH/MULTI/EXEC), script loading,
# and the cluster topology calls of the cluster client.
CONNECTION = (
    "+ping", "+echo", "+hello", "+auth", "+select", "+quit", "+reset",
    "+client|setname", "+client|getname", "+client|id", "+client|info",
    "+multi", "+exec", "+discard", "+unwatch",
    "+script|load", "+script|exists",
    "+command", "+command|docs", "+command|info", "+command|count",
    "+readonly", "+readwrite", "+cluster|slots", "+cluster|shards", "+cluster|nodes", "+cluster|info",
    "+cluster|myid", "+time", "+acl|whoami",
)
SCRIPTS = ("+evalsha", "+eval", "+evalsha_ro", "+eval_ro")
STREAM_READ = ("+xrange", "+xrevrange", "+xread", "+xlen", "+xinfo", "+exists", "+type")
GROUP = ("+xreadgroup", "+xack", "+xclaim", "+xautoclaim", "+xpending", "+xgroup|create",
         "+xgroup|createconsumer", "+xgroup|delconsumer")
STRING_STATE = ("+get", "+set", "+pexpire", "+pttl", "+del", "+exists", "+watch")
APPEND = ("+xadd", "+xtrim", "+hget", "+hset", "+hgetall", "+hmget")
MEMBERSHIP = ("+zadd", "+zrem", "+zrange", "+zremrangebyscore")
STATE = ("+@read", "+@write", "+@keyspace", "+@hash", "+@set", "+@string", "+@list", "+@sortedset",
         "+watch", *SCRIPTS, "-@dangerous", "-@admin", "-@pubsub")


def user_name(service: str) -> str:
    return f"{USER_PREFIX}{service}"


def password_env(service: str) -> str:
    """The environment variable ``klinebus acl`` reads a user's password from."""
    return f"KLINEBUS_ACL_{service.upper()}_PASSWORD"


def _selector(keys: Iterable[str], commands: Iterable[str]) -> str:
    return "(" + " ".join([*(f"~{k}" for k in keys), *commands]) + ")"


def _glob_escape(key: str) -> str:
    """A literal key as an ACL glob (Redis globs treat ``* ? [ ] \\`` as special)."""
    out = []
    for ch in key:
        out.append("\\" + ch if ch in "*?[]\\" else ch)
    return "".join(out)


def _streams(topic: str) -> list[str]:
    """Globs of a topic's stream on every partition: partition 0 is the topic's own key; the
    others, ``{topic#N}``, exist only for the partitioned topics. One glob covers any partition
    count, so changing the count needs no new ACL."""
    out = [_glob_escape(topics.stream_key(topic))]
    if topic in topics.PARTITIONED:
        out.append(_glob_escape(f"{topics.KEY_PREFIX}:{{{topic}#") + "[1-9]*}")
    return out


def _keys(topic: str, what: str = "") -> list[str]:
    """The stream globs (``what`` empty) or those of one companion key, on every partition."""
    return [k + (f":{_glob_escape(what)}" if what else "") for k in _streams(topic)]


def rules(access: topics.Access) -> list[str]:
    """The ACL rules (after ``on``/password) of one service's user."""
    s = access.service
    out = ["resetchannels", "resetkeys", "-@all", *CONNECTION]
    # The deployment's partition count: read at start, recorded by the first service to start.
    out.append(_selector([_glob_escape(topics.partitions_key())], ("+get", "+set", "+exists")))
    # Every topic stream, read-only; every dedupe hash, read-only.
    out.append(_selector([f"{topics.KEY_PREFIX}:{{*}}"], STREAM_READ))
    out.append(_selector([f"{topics.KEY_PREFIX}:{{*}}:{LAST_OPEN_TIME}"], ("+hget", "+hgetall", "+hmget", "+exists", "+type")))
    for t in access.produces:
        out.append(_selector([*_keys(t), *_keys(t, LAST_OPEN_TIME)], (*APPEND, *STREAM_READ, *SCRIPTS)))
    for t in access.consumes:
        companions = [k for what in ("acked", "owner") for k in _keys(t, f"{what}:{s}")]
        out.append(_selector([*_keys(t), *companions], (*GROUP, *STREAM_READ, *SCRIPTS)))
        out.append(_selector(companions, (*STRING_STATE, *SCRIPTS)))
    if access.consumes:
        # The owner leases (partition 0's is the service's lease of old) and the membership the
        # replicas balance partitions by.
        owner = _glob_escape(f"{topics.KEY_PREFIX}:owner:{s}")
        members = _glob_escape(f"{topics.KEY_PREFIX}:members:{s}")
        out.append(_selector([owner, owner + "#[1-9]*", members], (*STRING_STATE, *MEMBERSHIP, *SCRIPTS)))
    if access.state:
        keys = [f"{k}:{g}" for t, g in access.state for k in _streams(t)]
        out.append(_selector(keys, STATE))
    return out


def _password_rule(password: str | None) -> list[str]:
    if not password:
        return ["off", "resetpass"]  # fails closed: a user without a password cannot log in
    return ["on", "resetpass", "#" + hashlib.sha256(password.encode()).hexdigest()]


def acl_file(passwords: Mapping[str, str | None] | None = None, admin_password: str | None = None) -> str:
    """The ACL file (``aclfile`` in redis.conf, or ``ACL LOAD``): one ``user`` line per service.

    ``passwords``: service -> password (only its SHA-256 is written). A service without one is
    written ``off`` (it cannot log in). The ``default`` user is turned off; ``klinebus-admin``
    (every command, for operators and migrations) is on only when ``admin_password`` is given."""
    passwords = passwords or {}
    lines = [  # an ACL file has no comments: what it is is said in docs/threat-model.md
        "user default off resetpass resetkeys resetchannels -@all",
        " ".join(["user", ADMIN_USER, *_password_rule(admin_password), "~*", "&*", "+@all"]),
    ]
    for service, access in topics.ACCESS.items():
        lines.append(" ".join(["user", user_name(service), *_password_rule(passwords.get(service)), *rules(access)]))
    return "\n".join(lines) + "\n"


def acl_setuser_commands(passwords: Mapping[str, str | None] | None = None) -> str:
    """The same users as ``ACL SETUSER`` commands (for a managed Redis that takes commands, not
    files: pipe into ``redis-cli``), one per line, without the default/admin users."""
    passwords = passwords or {}
    lines = []
    for service, access in topics.ACCESS.items():
        lines.append(" ".join(["ACL", "SETUSER", user_name(service), "reset",
                               *_password_rule(passwords.get(service)), *rules(access)]))
    return "\n".join(lines) + "\n"


def passwords_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    env = os.environ if environ is None else environ
    return {s: env.get(password_env(s)) or None for s in topics.ACCESS}
