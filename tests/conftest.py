"""Test-suite wiring: the real-part fixtures are plugins every test can use."""

pytest_plugins = [
    "tests.fixtures.qemu",
    "tests.fixtures.guest",
    "tests.fixtures.guestfs",
    "tests.fixtures.libvirt",
    "tests.fixtures.notify",
    "tests.fixtures.redis",
    "tests.fixtures.s3",
]
