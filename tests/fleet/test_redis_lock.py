"""Redis leases on a real private Redis: exclusion, renewal, expiry of a dead holder, loss."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.common import wait_until
from tests.fixtures.redis import RedisServer
from vmvault.scheduler.leader import Leadership
from vmvault.worker.redis_keys import LEADER_KEY
from vmvault.worker.redis_lock import LockBusyError, LockLostError, RedisLease, domain_lease


def test_one_holder_at_a_time_and_release(redis_server: RedisServer) -> None:
    client = redis_server.client()
    with domain_lease(client, "web1", ttl=5, owner="hv1/job1") as lease:
        other = RedisLease(client, lease.key, ttl=5, owner="hv2/job2")
        with pytest.raises(LockBusyError, match="held by hv1/job1"):
            other.acquire()
        lease.check()
    # Released: the next job takes it at once.
    with domain_lease(client, "web1", ttl=5):
        pass


def test_renewal_keeps_a_live_holder(redis_server: RedisServer) -> None:
    client = redis_server.client()
    lease = RedisLease(client, "vmvault:lock:domain:db1", ttl=0.6)
    lease.acquire()
    try:
        time.sleep(1.5)  # 2.5 TTLs: only renewal keeps the key alive
        assert client.get(lease.key) == lease.token.encode()
        lease.check()
    finally:
        lease.release()
    assert client.get(lease.key) is None


def test_dead_holder_frees_after_ttl(redis_server: RedisServer) -> None:
    """A holder that stops renewing (killed worker) blocks others only for its TTL."""
    client = redis_server.client()
    client.set("vmvault:lock:domain:web2", "deadworker:abc", px=700)
    lease = RedisLease(client, "vmvault:lock:domain:web2", ttl=5)
    assert not lease.try_acquire()
    wait_until(lease.try_acquire, 3, "lock free after the dead holder's TTL")
    lease.release()


def test_lost_lease_stops_the_job(redis_server: RedisServer) -> None:
    client = redis_server.client()
    lease = RedisLease(client, "vmvault:lock:domain:web1", ttl=0.6)
    lease.acquire()
    try:
        # Someone (an operator, a Redis failover) replaced the key: the renewal notices.
        client.set(lease.key, "intruder")
        wait_until(lease.lost.is_set, 3, "lease marked lost")
        with pytest.raises(LockLostError, match="lease lost"):
            lease.check()
    finally:
        lease.release()
    # release() never deletes a key it does not own.
    assert client.get(lease.key) == b"intruder"


def test_leadership_single_leader_and_takeover_after_redis_restart(
    redis_server: RedisServer,
) -> None:
    a = Leadership(redis_server.client(), ttl=1.0, name="sched-a")
    b = Leadership(redis_server.client(), ttl=1.0, name="sched-b")
    assert a.is_leader()
    assert not b.is_leader()
    assert b.holder() == "sched-a"
    redis_server.restart()  # the lease key is gone with Redis's memory
    wait_until(lambda: a.is_leader() or b.is_leader(), 5, "a leader after Redis restart")
    assert not (a.is_leader() and b.is_leader())
    leader = a if a.is_leader() else b
    leader.resign()
    follower = b if leader is a else a
    assert follower.is_leader()
    assert redis_server.client().get(LEADER_KEY) is not None
    follower.resign()
