#!/usr/bin/env bash
# Set up this checkout for working on pytest-qemu-sandbox, on a Debian or Ubuntu host,
# idempotently, as an ordinary account or as root:
#   1. host packages through apt            (needs root: sudo is used for this only)
#   2. a subordinate id range for builds    (needs root: only if this account has none)
#   3. a virtualenv in .venv with the package and its test tools (as you, no sudo)
# Without sudo it says exactly what to ask an administrator for. Safe to run again: it only
# adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# syslinux, dosfstools and mtools: clones' boot disks (sandbox/vm/bootdisk.py; dosfstools and
# mtools also build the test suite's "foreign" disk image with fdisk); ovmf: UEFI firmware
# for imported images with boot = "uefi".
packages=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs genext2fs uidmap debian-archive-keyring openssh-client
          syslinux dosfstools mtools iproute2 python3-venv ovmf fdisk)
me=$(id -un)
root_steps=()   # what needs root, as commands

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    root_steps+=("apt-get update -qq"
                 "env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}")
fi

# An ordinary account builds images in a user namespace (mmdebstrap --mode=unshare), which
# maps the tree's owners onto the account's subordinate ids: 65536 of them.
if [ "$(id -u)" -ne 0 ]; then
    has_range() { grep -Eq "^($me|$(id -u)):[0-9]+:[0-9]+$" "$1" 2>/dev/null; }
    if ! has_range /etc/subuid || ! has_range /etc/subgid; then
        start=$(cat /etc/subuid /etc/subgid 2>/dev/null \
                | awk -F: 'BEGIN { end = 100000 } NF == 3 && $2 + $3 > end { end = $2 + $3 }
                           END { print end }')
        root_steps+=("usermod --add-subuids $start-$((start + 65535)) --add-subgids $start-$((start + 65535)) $me")
    fi
fi

if [ "${#root_steps[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null && { [ -t 0 ] || sudo -n true 2>/dev/null; }; then
        as_root=(sudo)
    else
        echo "install.sh: these steps need root, and sudo is not available to $me." >&2
        echo "Ask an administrator to run:" >&2
        for step in "${root_steps[@]}"; do echo "  $step" >&2; done
        echo "then run ./install.sh again." >&2
        exit 1
    fi
    for step in "${root_steps[@]}"; do
        echo "install.sh: ${as_root[*]:+${as_root[*]} }$step"
        # shellcheck disable=SC2086  # each step is a command line of plain words
        "${as_root[@]}" $step >/dev/null
    done
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# The registry server for tests/test_registry.py, unpacked into .tools/ rather than
# installed: installing Debian's docker-registry package would start its service, an open
# registry (no auth, no TLS) listening on every interface. apt-get download and dpkg-deb -x
# need no root; the tests start their own server on 127.0.0.1 with their own config.
registry_bin=.tools/docker-registry/usr/bin/docker-registry
if [ ! -x "$registry_bin" ]; then
    download=$(mktemp -d)
    chmod 755 "$download"   # apt fetches as its own _apt account where it can
    trap 'rm -rf "$download"' EXIT
    if (cd "$download" && apt-get download -q docker-registry >/dev/null 2>&1); then
        mkdir -p .tools/docker-registry
        dpkg-deb -x "$download"/docker-registry_*.deb .tools/docker-registry
    else
        echo "install.sh: docker-registry could not be downloaded (apt-get update as root" \
             "may help); the registry tests need it" >&2
        exit 1
    fi
fi
# OpenSSH's server for tests/test_remote_workers.py (pytest-xdist workers over ssh), unpacked
# into .tools/ like docker-registry and for the same reason: installing openssh-server would
# start its service, listening on every interface. The test starts its own sshd on 127.0.0.1
# with its own config and keys. libwrap0, which sshd links and hosts without openssh-server
# lack, goes beside it (the test puts its directory on LD_LIBRARY_PATH).
sshd_bin=.tools/openssh-server/usr/sbin/sshd
if [ ! -x "$sshd_bin" ] || ! compgen -G ".tools/openssh-server/usr/lib/*/libwrap.so.0" >/dev/null; then
    ssh_download=$(mktemp -d)
    chmod 755 "$ssh_download"
    trap 'rm -rf "${download:-}" "$ssh_download"' EXIT
    if (cd "$ssh_download" && apt-get download -q openssh-server libwrap0 >/dev/null 2>&1); then
        mkdir -p .tools/openssh-server
        for deb in "$ssh_download"/*.deb; do dpkg-deb -x "$deb" .tools/openssh-server; done
    else
        echo "install.sh: openssh-server could not be downloaded (apt-get update as root" \
             "may help); tests/test_remote_workers.py needs it" >&2
        exit 1
    fi
fi
echo "install.sh: ready: .venv/bin/sandbox, .venv/bin/pytest (check the host: .venv/bin/sandbox doctor)"
