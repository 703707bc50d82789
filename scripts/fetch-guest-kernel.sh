#!/bin/sh
# Fetch the Debian kernel package the test guest boots (tests/fixtures/guest_image.py) into DIR.
# linux-image-amd64 is a metapackage; the kernel is in the versioned package it depends
# on (linux-image-6.1.0-NN-amd64 on Debian 12, linux-image-6.12.NN+deb13-amd64 on 13).
# Only downloaded (apt-get download), never installed: the host's kernel and /boot stay as
# they are. Idempotent: nothing is fetched when DIR already holds that package.
set -eu
dir=$1
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[^ <>]*\).*/\1/p' | head -n 1)
if [ -z "$pkg" ]; then
    echo "setup: cannot tell which kernel package linux-image-amd64 depends on (apt-get update?)" >&2
    exit 1
fi
if ls "$dir/${pkg}_"*.deb >/dev/null 2>&1; then
    exit 0
fi
mkdir -p "$dir"
rm -f "$dir"/linux-image-*.deb
echo "setup: fetching $pkg for the test guest"
# apt's sandbox user cannot write into a root-owned directory: download unsandboxed.
(cd "$dir" && apt-get download -q -o APT::Sandbox::User=root "$pkg")
