#!/usr/bin/env bash
# The milters of the milter client tests (tests/milter/test_real_milters.py): run as root.
# OpenDKIM signs through the milter protocol; clamav-milter sits in front of the test clamd
# (scripts/deps-clamav.sh). The tests start their own daemons on loopback; none is started on install.
set -euo pipefail
if [ ! -e /usr/sbin/policy-rc.d ]; then  # no daemon may start on install
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi
missing=""
for p in opendkim opendkim-tools clamav-milter; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq  # a fresh machine has no package lists yet
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing
fi
