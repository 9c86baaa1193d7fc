#!/usr/bin/env bash
# Install what pytest-qemu-sandbox needs on a Debian or Ubuntu host, idempotently:
# host packages through apt (as root, or through sudo), then a virtualenv in .venv
# with the package and its test tools. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

packages=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client iproute2)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null; then
        as_root=(sudo)
    else
        echo "install.sh: missing host packages: ${missing[*]}; install them as root:" >&2
        echo "  apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "install.sh: installing host packages: ${missing[*]}"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
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
echo "install.sh: ready: .venv/bin/sandbox, .venv/bin/pytest"
