"""``domains.<name>.libvirt`` in the config: exactly one of qmp and libvirt, defaults."""

from __future__ import annotations

from typing import Any

import pytest

from vmvault.worker.config import ConfigError, parse_config


def _config(domain: dict[str, Any]) -> Any:
    return parse_config(
        {"repository": {"url": "file:///tmp/r"}, "domains": {"web1": {"host": "hv1", **domain}}},
        "vmvault.yaml",
    )


def test_libvirt_defaults_to_the_system_uri_and_the_key_as_name() -> None:
    dom = _config({"libvirt": {}}).domain("web1")
    assert dom.libvirt is not None and dom.libvirt.uri == "qemu:///system"
    assert dom.libvirt_name("web1") == "web1"
    assert dom.qmp is None


def test_libvirt_name_and_uri_are_taken() -> None:
    dom = _config({"libvirt": {"uri": "qemu+ssh://h/system", "name": "www"}}).domain("web1")
    assert dom.libvirt is not None and dom.libvirt.uri == "qemu+ssh://h/system"
    assert dom.libvirt_name("web1") == "www"


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({}, "set exactly one of qmp"),
        ({"qmp": "/run/q.sock", "libvirt": {}}, "set exactly one of qmp"),
        ({"libvirt": {"uri": "system"}}, "bad libvirt URI"),
        (
            {"libvirt": {}, "launch": {"argv": ["qemu-system-x86_64", "-qmp", "{qmp}"]}},
            "launch applies to qmp domains only",
        ),
        ({"libvirt": {"name": ""}}, "domains.web1.libvirt.name"),
    ],
)
def test_bad_libvirt_domains_are_refused_with_the_key(domain: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(domain)
    assert message in str(info.value)


def test_qmp_operations_on_a_libvirt_domain_say_why() -> None:
    dom = _config({"libvirt": {}}).domain("web1")
    with pytest.raises(ConfigError, match="web1 is managed by libvirt"):
        dom.qmp_socket("web1")
