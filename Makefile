# vmvault — developer entry points. Everything a fresh Debian 12/13 machine needs
# (as root) is installed by `make setup`, which every other target runs first.

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.setup-stamp
DEB_PKGS  := qemu-system-x86 qemu-utils python3-venv python3-libnbd libnbd-bin redis-server \
             procps openssl busybox-static qemu-guest-agent kmod cpio e2fsprogs \
             nbdkit nbdkit-plugin-python python3-guestfs guestfish guestmount \
             linux-image-amd64 xfsprogs \
             libvirt-daemon-system libvirt-clients python3-libvirt virtnbdbackup
# The test guest's kernel package (downloaded only; tests/fixtures/guest_image.py).
GUEST_DEBS := $(VENV)/guest-debs

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): Makefile pyproject.toml scripts/setup-debian.sh scripts/fetch-guest-kernel.sh
	sh scripts/setup-debian.sh $(DEB_PKGS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	sh scripts/fetch-guest-kernel.sh $(GUEST_DEBS)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# The main job on embedded defaults: a demo VM, full + incremental backup, restore, verify.
demo: setup
	$(VENV)/bin/vmvault demo

# Speed and memory figures, each against a reference tool measured in the same run.
bench: setup
	for b in cli storage backup incremental restore scheduler guest copy notify libvirt; do $(PY) bench/$${b}_bench.py || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
