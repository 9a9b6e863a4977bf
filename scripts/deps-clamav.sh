#!/usr/bin/env bash
# ClamAV's clamd for the malware scanning tests (tests/malware/test_clamd_real.py): run as root.
# The tests start their own clamd on loopback with a hand-made database (EICAR built at run time
# and a custom signature); freshclam is pulled in as a dependency but never started or run.
set -euo pipefail
if [ ! -e /usr/sbin/policy-rc.d ]; then  # no daemon may start on install (freshclam would download)
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
if ! command -v clamd >/dev/null 2>&1 || ! command -v sigtool >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq  # a fresh machine has no package lists yet
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends clamav-daemon clamav
fi
