"""The reaper: removes what dead jobs left on this host's domains, at worker start and periodically.

A job killed with SIGKILL (OOM killer, a second ``systemctl stop``, a crashed host agent)
cannot tear down: its fleecing filters stay in front of the guest's disks and copy every
first write to a scratch file, a guest it had paused stays paused, file systems it had
frozen through the guest agent stay frozen (``worker/freeze.py``). The next job on the
domain removes all that first, but a domain may have no job for a day. So the worker
looks every ``scheduler.reaper_interval_seconds``.

A job is dead when its domain's lock (``worker/locks.py``, an ``flock``) can be taken:
the kernel frees it when the holder dies, whatever killed it. A live job holds it, so
the reaper never touches a running backup or restore. The periodic passes take that lock
only for a domain whose marker files say a job ended without its teardown
(``worker/cleanup.py``, ``worker/restore_cleanup.py``): a job starting at that moment
would otherwise find its domain busy for nothing.
"""

from __future__ import annotations

import logging
import threading

from vmvault.worker.cleanup import has_leftovers, remove_leftovers
from vmvault.worker.config import FleetConfig
from vmvault.worker.freeze import thaw_leftover
from vmvault.worker.locks import DomainBusyError, domain_lock
from vmvault.worker.qmp import open_session
from vmvault.worker.restore_cleanup import remove_restore_leftovers
from vmvault.worker.restore_test import clean_restore_tests

log = logging.getLogger(__name__)


def reap_host(config: FleetConfig, host: str, thorough: bool = False) -> int:
    """Remove dead jobs' leftovers on every domain of ``host``; returns domains cleaned.

    ``thorough`` (at worker start) looks into every domain's QEMU, markers or not. A
    domain that is down or busy is skipped: the next pass (or its next job) sees it.
    """
    cleaned = 0
    try:
        # Restore tests that were killed: their isolated QEMU and scratch directory.
        cleaned += clean_restore_tests(config.state_dir)
    except OSError as err:
        log.warning("reaper: leftovers of restore tests not removed: %s", err)
    for name, domain in sorted(config.domains.items()):
        if domain.host != host:
            continue
        try:
            if remove_restore_leftovers(config, name):
                cleaned += 1
        except Exception as err:
            log.warning("reaper: leftovers of a restore of %s not removed: %s", name, err)
        if domain.libvirt is not None:
            if thorough or has_leftovers(config.state_dir, name):
                cleaned += _reap_libvirt(config, name)
            continue
        if domain.qmp is None or not domain.qmp.exists():
            continue
        if not thorough and not has_leftovers(config.state_dir, name):
            continue
        try:
            with (
                domain_lock(config.state_dir, name, "cleanup"),
                open_session(name, domain.qmp, config.backup.io_timeout_seconds) as session,
            ):
                # Resumed first (remove_leftovers): a paused guest's agent cannot thaw.
                removed = bool(remove_leftovers(session, config.state_dir))
                if thaw_leftover(config, name) or removed:
                    cleaned += 1
        except DomainBusyError:
            continue  # a live job: it cleans up after itself
        except Exception as err:
            log.warning("reaper: leftovers of domain %s not removed: %s", name, err)
    return cleaned


def _reap_libvirt(config: FleetConfig, name: str) -> int:
    """End the backup job a dead job left on libvirt domain ``name``; 1 when it did."""
    # Imported here: python3-libvirt is needed on hosts with libvirt domains only.
    from vmvault.worker.backup import DomainStateError
    from vmvault.worker.libvirt_backup import remove_libvirt_leftovers
    from vmvault.worker.libvirt_domain import open_domain

    dom = config.domain(name)
    assert dom.libvirt is not None
    try:
        with (
            domain_lock(config.state_dir, name, "cleanup"),
            open_domain(name, dom.libvirt.uri, dom.libvirt_name(name)) as lv,
        ):
            return int(remove_libvirt_leftovers(lv, config.state_dir))
    except (DomainBusyError, DomainStateError):
        return 0  # a live job of ours, or someone else's job (a migration): not ours to end
    except Exception as err:
        log.warning("reaper: leftovers of libvirt domain %s not removed: %s", name, err)
        return 0


class Reaper:
    """A daemon thread running :func:`reap_host` every ``interval`` seconds until stopped."""

    def __init__(self, config: FleetConfig, host: str, interval: float) -> None:
        self.config = config
        self.host = host
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vmvault-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                cleaned = reap_host(self.config, self.host)
            except Exception as err:  # the reaper must outlive any one bad pass
                log.warning("reaper: pass failed: %s", err)
                continue
            if cleaned:
                log.warning("reaper: removed leftovers of dead jobs on %d domain(s)", cleaned)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
