#!/usr/bin/env bash
# systemd-analyze, for the check of etc/exmta.service (tests/admin/test_systemd_unit.py).
# Idempotent; called by scripts/install-test-deps.sh (as root). Installs no service that starts.
set -euo pipefail
if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq
timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends systemd
command -v systemd-analyze >/dev/null 2>&1 || { echo "[deps-systemd] systemd-analyze missing after install" >&2; exit 1; }
