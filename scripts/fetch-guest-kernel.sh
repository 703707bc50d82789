#!/bin/sh
# Fetch the Debian kernel package the test guest boots (tests/fixtures/guest_image.py) into DIR.
# linux-image-amd64 is a metapackage; the kernel is in the versioned package it depends
# on (linux-image-6.1.0-NN-amd64 on Debian 12, linux-image-6.12.NN+deb13-amd64 on 13).
# Only downloaded (apt-get download), never installed: the host's kernel and /boot stay as
# they are. Idempotent: nothing is fetched when DIR already holds that package.
set -eu
dir=$1
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[^ <>]*\).*/\1/p' | head -n 1
}
pkg=$(kernel_package)
if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null  # a fresh image may come without package lists
    pkg=$(kernel_package)
fi
if [ -z "$pkg" ]; then
    echo "setup: cannot tell which kernel package linux-image-amd64 depends on (apt-get update?)" >&2
    exit 1
fi
if ls "$dir/${pkg}_"*.deb >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$dir"
echo "setup: fetching $pkg for the test guest"
# apt's sandbox user cannot write into a root-owned directory: download unsandboxed.
if (cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg"); then
    for old in "$dir"/linux-image-*.deb; do
        case "$old" in
            "$dir/${pkg}_"*) ;;
            *) rm -f "$old" ;;
        esac
    done
elif ls "$dir"/linux-image-*.deb >/dev/null 2>&1; then
    echo "setup: could not fetch $pkg; the test guest keeps the kernel package it has" >&2
else
    exit 1
fi
