"""Application-consistent checkpoints: the guest's file systems frozen around the checkpoint.

With ``domains.<name>.guest_agent`` set, a backup takes its point in time like this::

    pre_freeze hook (guest-exec, bounded)
      marker <state_dir>/run/<domain>.frozen           written before the freeze
      guest-fsfreeze-freeze (or -freeze-list of freeze_mountpoints), bounded
        guest paused, checkpoint transactions, filters in, guest resumed (worker/fleece.py)
      guest-fsfreeze-thaw, bounded                      frozen_ms measured up to here
      marker removed                                    only once the thaw succeeded
    post_thaw hook (guest-exec, bounded)

The thaw runs whatever happens in between: an exception, SIGTERM or SIGINT (the frozen
window is a ``critical`` section: signals wait for the thaw, ``worker/signals.py``). A
freeze that timed out may still complete in the guest, so it is thawed too. Only SIGKILL
can leave the guest frozen: the marker then tells the next job on the domain or the
worker's reaper to thaw it (:func:`thaw_leftover`).

When the agent is absent, does not answer, a hook fails or the freeze fails, the backup
goes on crash-consistent and says why (``consistency: crash``, ``consistency_reason``);
``require_freeze: true`` makes it fail instead (:class:`FreezeRequiredError`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmvault.worker.cleanup import frozen_marker, write_marker
from vmvault.worker.config import DomainConfig, FleetConfig, GuestHook
from vmvault.worker.errors import WorkerError
from vmvault.worker.guest_agent import GuestAgent, GuestAgentError
from vmvault.worker.signals import critical

log = logging.getLogger(__name__)

Consistency = Literal["application", "crash"]
NO_AGENT = "no guest agent configured (domains.<name>.guest_agent)"


class FreezeRequiredError(WorkerError):
    """``require_freeze`` is set and the guest's file systems could not be frozen (agent
    absent or not answering, a hook or the freeze failed). Retryable once the agent answers."""

    retryable = True


class HookError(WorkerError):
    """A pre_freeze/post_thaw command failed in the guest or did not end in time."""


@dataclass
class FreezeOutcome:
    """How consistent the point in time is, why, and how long the guest was frozen."""

    consistency: Consistency
    reason: str
    frozen_ms: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        """The optional manifest members (docs/repository-format.md, section 9)."""
        return {
            "consistency": self.consistency,
            "consistency_reason": self.reason,
            "frozen_ms": None if self.frozen_ms is None else round(self.frozen_ms, 1),
        }


@contextmanager
def guest_frozen(config: FleetConfig, domain: str, running: bool = True) -> Iterator[FreezeOutcome]:
    """Freeze the domain's guest file systems for the block (see the module docstring).

    Yields the outcome; ``frozen_ms`` is filled in when the block has ended and the guest
    is thawed. A guest that is not ``running`` (paused by its manager) cannot answer: it
    is not asked.
    """
    dom = config.domain(domain)
    if dom.guest_agent is None:
        yield FreezeOutcome("crash", NO_AGENT)
        return
    if not running:
        yield _not_frozen(dom, domain, "the guest is not running (paused): its agent cannot freeze")
        return
    agent = GuestAgent(domain, dom.guest_agent)
    marker = frozen_marker(config.state_dir, domain)
    hook_ran = False
    try:
        failure: str | None = None
        try:
            agent.connect()
            if dom.pre_freeze is not None:
                hook_ran = True
                _run_hook(agent, dom.pre_freeze, "pre_freeze")
        except (GuestAgentError, HookError) as err:
            failure = str(err)
        if failure is not None:
            yield _not_frozen(dom, domain, failure)
            return
        with critical():
            write_marker(marker)
            started = time.monotonic()
            try:
                count = agent.fsfreeze_freeze(dom.freeze_mountpoints, dom.freeze_timeout_seconds)
            except GuestAgentError as err:
                # On a command error the agent has thawed what it froze; after a timeout
                # the freeze may still complete: thaw either way.
                _thaw(agent, marker, domain)
                failure = f"freezing failed: {err}"
            except BaseException:
                _thaw(agent, marker, domain)
                raise
            if failure is not None:
                yield _not_frozen(dom, domain, failure)
                return
            what = ", ".join(dom.freeze_mountpoints or []) or "all mounted file systems"
            outcome = FreezeOutcome("application", f"{count} file system(s) frozen ({what})")
            try:
                yield outcome
            finally:
                thawed = _thaw(agent, marker, domain)
                outcome.frozen_ms = (time.monotonic() - started) * 1000
                if not thawed:
                    outcome.warnings.append("the thaw failed: the reaper retries it")
                log.info(
                    "domain %s: guest file systems frozen for %.1f ms", domain, outcome.frozen_ms
                )
    finally:
        try:
            if hook_ran and dom.post_thaw is not None:
                _run_hook(agent, dom.post_thaw, "post_thaw")
        except (GuestAgentError, HookError) as err:
            log.warning("domain %s: %s", domain, err)
        finally:
            agent.close()


def _not_frozen(dom: DomainConfig, domain: str, why: str) -> FreezeOutcome:
    if dom.require_freeze:
        raise FreezeRequiredError(
            f"domain {domain!r}: guest file systems not frozen ({why}) and require_freeze "
            "is set: check that qemu-ga runs in the guest, or unset require_freeze to accept "
            "a crash-consistent backup"
        )
    log.warning("domain %s: backing up crash-consistent: %s", domain, why)
    return FreezeOutcome("crash", why)


def _thaw(agent: GuestAgent, marker: Path, domain: str) -> bool:
    """Thaw (a new connection if the last call timed out); the marker goes only on success."""
    try:
        agent.fsfreeze_thaw()
    except GuestAgentError as err:
        log.error(
            "domain %s: thawing the guest's file systems failed: %s; it may still be frozen "
            "(the worker's reaper and the next backup retry)",
            domain,
            err,
        )
        return False
    marker.unlink(missing_ok=True)
    return True


def _run_hook(agent: GuestAgent, hook: GuestHook, name: str) -> None:
    try:
        result = agent.run(hook.argv[0], hook.argv[1:], hook.timeout_seconds)
    except GuestAgentError as err:
        raise HookError(f"{name} hook {hook.argv[0]}: {err}") from err
    if result.exitcode != 0:
        tail = result.stderr.decode(errors="replace").strip()[-200:]
        how = f"exit code {result.exitcode}" if result.signal is None else f"signal {result.signal}"
        raise HookError(f"{name} hook {hook.argv[0]} ended with {how}: {tail}")


def thaw_leftover(config: FleetConfig, domain: str) -> bool:
    """Thaw a guest that a dead job left frozen (its marker is there); True when thawed.

    Callers hold the domain's lock (``worker/locks.py``): the job that wrote the marker is
    dead, so its freeze is not ours to keep.
    """
    marker = frozen_marker(config.state_dir, domain)
    if not marker.exists():
        return False
    dom = config.domain(domain)
    if dom.guest_agent is None:
        log.warning(
            "domain %s: a dead job froze the guest, but no guest_agent is configured "
            "any more: thaw it by hand (guest-fsfreeze-thaw)",
            domain,
        )
        marker.unlink(missing_ok=True)
        return False
    with GuestAgent(domain, dom.guest_agent) as agent:
        try:
            thawed = agent.fsfreeze_thaw()
        except GuestAgentError as err:
            log.error(
                "domain %s: a dead job left the guest frozen; thawing failed: %s", domain, err
            )
            return False
    marker.unlink(missing_ok=True)
    log.warning("domain %s: thawed %d file system(s) a dead job left frozen", domain, thawed)
    return True
