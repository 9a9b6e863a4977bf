#!/usr/bin/env bash
# Debian packages for the MTA-STS/DANE tests (tests/tlspolicy/): unbound validates the zones Knot
# signs (knot is installed by install-test-deps.sh). Idempotent; run as root.
set -euo pipefail
if ! dpkg-query -W -f='${Status}' unbound 2>/dev/null | grep -q "install ok installed"; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends unbound
fi
command -v unbound >/dev/null 2>&1 || [ -x /usr/sbin/unbound ] || { echo "[deps-dane] unbound missing" >&2; exit 1; }
command -v keymgr >/dev/null 2>&1 || [ -x /usr/sbin/keymgr ] || { echo "[deps-dane] keymgr (knot) missing" >&2; exit 1; }
