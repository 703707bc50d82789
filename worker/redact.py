"""Masking of URL passwords (the broker's) in everything vmvault prints, logs or records.

The broker URL may carry Redis's password (``redis://:secret@host:6379/0``), and whoever
has it controls the fleet (docs/fleet.md, "Trust boundary"). Messages of Redis, kombu and
Celery errors, config summaries and job records pass through ``redact`` before anyone
sees them; it needs no knowledge of the password, only the URL shape.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://[user]:password@ — the password runs to the *last* '@' before the host part
# ends (a '/' or whitespace), as urlsplit reads it: "redis://:a@b@host" has password "a@b".
_URL_PASSWORD_RE = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<password>[^/\s]*)@(?=[^@/\s]*(?:[/\s]|$))"
)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL masked."""
    if "://" not in text:  # the common case, on every job record write and log line
        return text
    return _URL_PASSWORD_RE.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def mask_url(url: str) -> str:
    """``url`` for display: ``redis://:***@host:6379/0`` when it carries a password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))
