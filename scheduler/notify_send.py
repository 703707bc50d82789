"""Sending one event to one target: a webhook POST or an e-mail through SMTP.

Each call either returns (the target accepted the event) or raises ``DeliveryError``
with a one-line reason; retries and backoff are the caller's (notify_delivery).
"""

from __future__ import annotations

import json
import smtplib
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from typing import Any

from vmvault.scheduler.errors import SchedulerError
from vmvault.worker.config import FleetConfig
from vmvault.worker.notify_config import EmailTarget, SecretError, WebhookTarget
from vmvault.worker.notify_events import Event


class DeliveryError(SchedulerError):
    """A target did not take an event. Retryable (with backoff) up to ``max_tries``."""

    retryable = True


class UnknownTargetError(SchedulerError):
    """A command named a notification target the config does not list. Not retryable."""


def send(config: FleetConfig, target: str, event: Event) -> None:
    """Deliver ``event`` to the configured target named ``target``."""
    notifications = config.notifications
    if target in notifications.webhooks:
        send_webhook(target, notifications.webhooks[target], event)
    elif target in notifications.email:
        send_email(target, notifications.email[target], event)
    else:
        known = ", ".join(notifications.targets()) or "none"
        raise UnknownTargetError(
            f"unknown notification target {target!r} (configured: {known}); "
            "see notifications.webhooks / notifications.email"
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib turns a redirected POST into a GET without the body: a 3xx would then look
    # like a delivered event. Fail instead, naming the status, so the URL gets fixed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def send_webhook(name: str, target: WebhookTarget, event: Event) -> None:
    """POST the event as JSON; any 2xx is success."""
    try:
        token = target.token(name)
    except SecretError as err:
        raise DeliveryError(str(err)) from err
    request = urllib.request.Request(
        target.url,
        data=event.to_json().encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "vmvault-notify"},
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=target.timeout_seconds) as reply:
            status = reply.status
    except urllib.error.HTTPError as err:
        raise DeliveryError(f"webhook {name}: {target.url} answered HTTP {err.code}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DeliveryError(f"webhook {name}: {target.url} unreachable: {reason}") from err
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook {name}: {target.url} answered HTTP {status}")


def _message(target: EmailTarget, event: Event) -> EmailMessage:
    msg = EmailMessage()
    label = {"problem": "PROBLEM", "recovery": "RECOVERED", "test": "TEST"}.get(
        event.event, event.event.upper()
    )
    msg["Subject"] = f"[vmvault] {label}: {event.summary}"[:200]
    msg["From"] = target.from_
    msg["To"] = ", ".join(target.to)
    body = json.loads(event.to_json())
    msg.set_content(
        f"{event.summary}\n\n" + "\n".join(f"{k}: {v}" for k, v in sorted(body.items())) + "\n"
    )
    return msg


def send_email(name: str, target: EmailTarget, event: Event) -> None:
    """Send the event as one e-mail: STARTTLS (certificate verified) then AUTH if set."""
    try:
        password = target.password(name)
    except SecretError as err:
        raise DeliveryError(str(err)) from err
    try:
        with smtplib.SMTP(
            target.smtp_host, target.smtp_port, timeout=target.timeout_seconds
        ) as smtp:
            if target.starttls:
                smtp.starttls(context=ssl.create_default_context(cafile=target.ca_file))
            if target.username is not None and password is not None:
                smtp.login(target.username, password)
            smtp.send_message(_message(target, event))
    except (smtplib.SMTPException, OSError) as err:
        raise DeliveryError(
            f"email {name}: {target.smtp_host}:{target.smtp_port}: {err}".splitlines()[0]
        ) from err
