#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine.
# Idempotent: packages already present are skipped quickly by apt and pip.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

# Debian packages must not start their daemons on install (tests start their own).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi

debs="postfix swaks knot knot-dnsutils dovecot-core dovecot-lmtpd openssl"
missing=""
for p in $debs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing
fi

python3 -m pip install -q --disable-pip-version-check -e "$here[test]"
