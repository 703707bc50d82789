"""The guest agent client against qemu-ga in the real guest: calls, stale answers, no agent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.guest.conftest import GuestEnv
from vmvault.worker.guest_agent import (
    GuestAgent,
    GuestAgentCommandError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
)


def test_freeze_thaw_exec_and_a_stale_answer(guest_env: GuestEnv) -> None:
    guest = guest_env.guest
    with GuestAgent("vm", guest.qga_path) as agent:
        agent.ping()
        assert agent.fsfreeze_status() == "thawed"
        assert agent.fsfreeze_freeze(["/mnt/data"]) == 1
        assert agent.fsfreeze_status() == "frozen"
        # A write to the frozen file system waits until the thaw.
        guest.shell("(touch /mnt/data/blocked; touch /run/written) >/dev/null 2>&1 &")
        time.sleep(1)
        assert guest.shell("test -e /run/written || echo waiting").strip() == "waiting"
        assert agent.fsfreeze_thaw() == 1
        assert agent.fsfreeze_status() == "thawed"
        guest.shell("sleep 0.5; test -e /run/written")

        result = agent.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"], timeout=30)
        assert (result.exitcode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        with pytest.raises(GuestAgentTimeoutError, match="did not end within"):
            agent.run("/bin/sleep", ["5"], timeout=0.5)
        with pytest.raises(GuestAgentCommandError, match="guest-exec"):
            agent.exec("/no/such/program", [])

        # A call that gives up leaves its answer in flight: the next call reconnects, and
        # the sync handshake drops the stale answer instead of taking it for its own.
        with pytest.raises(GuestAgentTimeoutError):
            agent.call("guest-exec", {"path": "/bin/true"}, timeout=0.000001)
        assert agent.fsfreeze_status() == "thawed"


def test_no_agent_answers_within_the_timeout(guest_env: GuestEnv, tmp_path: Path) -> None:
    guest = guest_env.guest
    with pytest.raises(GuestAgentUnavailableError, match="cannot connect"):
        GuestAgent("vm", tmp_path / "missing.sock").connect()
    guest.shell("kill -STOP $(cat /run/qemu-ga.pid)")  # hung agent
    started = time.monotonic()
    with pytest.raises(GuestAgentUnavailableError, match="did not answer within 2s"):
        GuestAgent("vm", guest.qga_path, timeout=2).connect()
    assert time.monotonic() - started < 10
    guest.shell("kill -CONT $(cat /run/qemu-ga.pid)")
    with GuestAgent("vm", guest.qga_path) as agent:
        agent.ping()
