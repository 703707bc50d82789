"""The ``notifications:`` block of the fleet config: webhook and e-mail targets.

Secrets (a webhook's bearer token, an SMTP password) are read from a file or an
environment variable the config names, never from the YAML: a literal ``token`` or
``password`` key is refused with a message saying where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vmvault.storage.format import NAME_PATTERN

# Keys someone might write the secret itself under; each gets a pointer to *_file/*_env.
_LITERAL_SECRETS = {"token": "token_file or token_env", "password": "password_file or password_env"}


class SecretError(Exception):
    """A notification target's secret file/variable is unreadable or empty. Not retryable:
    fix the file or the environment."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secret(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, instead in _LITERAL_SECRETS.items():
                if key in data:
                    raise ValueError(
                        f"{key}: secrets do not belong in the config file; use {instead} "
                        "(a file holding it, or an environment variable)"
                    )
        return data


def _read_secret(what: str, path: Path | None, env: str | None) -> str | None:
    """The secret from ``path`` (trailing newline dropped) or ``$env``; None if neither."""
    if path is not None:
        try:
            value = path.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise SecretError(f"{what}: cannot read {path}: {reason}") from err
        if not value:
            raise SecretError(f"{what}: {path} is empty (write the secret into it)")
        return value
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise SecretError(f"{what}: environment variable {env} is unset or empty")
        return value
    return None


def _one_source(what: str, path: Path | None, env: str | None) -> None:
    if path is not None and env is not None:
        raise ValueError(f"{what}_file and {what}_env are both set: keep one")
    if path is not None and not path.is_absolute():
        raise ValueError(f"{what}_file must be an absolute path, got {str(path)!r}")


class WebhookTarget(_Strict):
    """HTTP POST of each event as JSON, with ``Authorization: Bearer <token>`` if set."""

    url: str
    token_file: Path | None = None
    token_env: str | None = None
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad webhook URL {url!r}: use http(s)://host/path")
        return url

    @model_validator(mode="after")
    def _token_source(self) -> Self:
        _one_source("token", self.token_file, self.token_env)
        return self

    def token(self, name: str) -> str | None:
        """The bearer token, read now (``SecretError`` when configured but unreadable)."""
        return _read_secret(f"notifications.webhooks.{name}.token", self.token_file, self.token_env)


class EmailTarget(_Strict):
    """One e-mail per event through an SMTP server (STARTTLS and AUTH when configured)."""

    smtp_host: str
    smtp_port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    # CA bundle that signed the SMTP server's certificate, when not the system's.
    ca_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("to")
    @classmethod
    def _addresses(cls, to: list[str]) -> list[str]:
        for address in to:
            if "@" not in address:
                raise ValueError(f"bad e-mail address {address!r}: want user@domain")
        return to

    @model_validator(mode="after")
    def _auth(self) -> Self:
        _one_source("password", self.password_file, self.password_env)
        has_password = self.password_file is not None or self.password_env is not None
        if has_password != (self.username is not None):
            raise ValueError("username and password_file/password_env go together")
        if self.username is not None and not self.starttls:
            raise ValueError("SMTP auth without starttls would send the password in clear")
        return self

    def password(self, name: str) -> str | None:
        """The SMTP password, read now (``SecretError`` when configured but unreadable)."""
        return _read_secret(
            f"notifications.email.{name}.password", self.password_file, self.password_env
        )


class NotificationsConfig(_Strict):
    """Where problem/recovery events go and how hard delivery tries."""

    webhooks: dict[str, WebhookTarget] = Field(default_factory=dict)
    email: dict[str, EmailTarget] = Field(default_factory=dict)
    # A target that keeps failing gets the event this many times at most, then a log line.
    max_tries: int = Field(default=8, ge=1, le=100)
    # Wait after the first failed try; doubled after each further one, at most an hour.
    retry_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Overdue backups (see docs/fleet.md) are reported; false turns that check off.
    overdue: bool = True

    @model_validator(mode="after")
    def _names(self) -> Self:
        import re

        pattern = re.compile(NAME_PATTERN)
        for kind, targets in (("webhooks", self.webhooks), ("email", self.email)):
            for name in targets:
                if not pattern.fullmatch(name):
                    raise ValueError(
                        f"{kind}: bad target name {name!r}: use letters, digits, '.', '_', '-'"
                    )
        both = set(self.webhooks) & set(self.email)
        if both:
            raise ValueError(f"target name(s) {sorted(both)} used for a webhook and an e-mail")
        return self

    def targets(self) -> list[str]:
        """Every target name, sorted (names are unique across kinds)."""
        return sorted([*self.webhooks, *self.email])
