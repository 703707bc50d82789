"""The private Redis fixture answers and is isolated from the machine's Redis."""

from tests.fixtures.redis import RedisServer


def test_redis_answers(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.ping()
    client.set("vmvault-test", b"42")
    assert client.get("vmvault-test") == b"42"
    assert redis_server.port != 6379


def test_redis_restart_loses_nothing_but_data(redis_server: RedisServer) -> None:
    redis_server.client().set("k", b"v")
    redis_server.restart()
    assert redis_server.client().get("k") is None
