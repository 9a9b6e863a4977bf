#!/usr/bin/env bash
# rspamd for the spam scanning tests (tests/spam/test_rspamd_real.py): run as root.
# The tests start their own rspamd on loopback with a private configuration (a local rule that
# flags a test string, every network module off, DNS aimed at a dead loopback port); the package's
# own service is never started (policy-rc.d) and nothing is downloaded at run time.
set -euo pipefail
if [ ! -e /usr/sbin/policy-rc.d ]; then  # no daemon may start on install
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
if ! command -v rspamd >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq  # a fresh machine has no package lists yet
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends rspamd
fi
