#!/usr/bin/env bash
# Installs everything the test suite needs on a Debian 12 machine (run as root).
# Idempotent: packages already present are skipped quickly by apt and pip.
#
#   Debian: postfix (also provides smtp-source / smtp-sink), swaks, knot,
#           knot-dnsutils, dovecot-core, dovecot-lmtpd, openssl
#   Python: this repository in ./.venv (scripts/install.sh test): editable,
#           "compat" mode so the repository root is on sys.path and
#           `.venv/bin/twistd exmta` finds twisted/plugins/exmta_plugin.py,
#           with the [test] extras.  Tests run with .venv/bin/python -m pytest.
#
# Environment: PYTHON (default python3) is the interpreter the venv is made from.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
log() { echo "[install-test-deps] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get); try: sudo bash $0"
    exit 1
fi

# Debian packages must not start their daemons on install (tests start their own).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi

debs="postfix swaks knot knot-dnsutils dovecot-core dovecot-lmtpd openssl ca-certificates"
debs="$debs libnet-ssleay-perl"  # swaks --tls (tests/tls/)
debs="$debs slapd ldap-utils"  # OpenLDAP for the SMTP AUTH LDAP checker tests (tests/support/slapd.py)
debs="$debs chromium"  # headless browser for the status page test (tests/integration/test_observe.py)
debs="$debs opendkim-tools spf-tools-perl"  # DKIM/SPF cross-checks (tests/filters/test_auth_crosscheck.py)
debs="$debs postgresql haproxy"  # the PostgreSQL queue store and the cluster behind HAProxy (tests/integration/test_cluster_faults.py)
# a clean Debian 12 may lack python3, and has it without venv/ensurepip
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    debs="$debs python3"
fi
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    debs="$debs python3-venv python3-pip"
fi
missing=""
for p in $debs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    log "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    timeout 600 apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    timeout 1200 apt-get install -y -qq --no-install-recommends $missing
fi

bash "$here/scripts/deps-systemd.sh"  # systemd-analyze verify of etc/exmta.service
# the tools the tests and benchmarks call directly
for tool in postfix postconf postqueue smtp-source smtp-sink swaks dovecot knotd kdig openssl slapd slapadd ldapwhoami chromium; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing after install: $tool"; exit 1; }
done
[ -x /usr/lib/dovecot/lmtp ] || { log "missing after install: /usr/lib/dovecot/lmtp"; exit 1; }
for tool in opendkim-testmsg spfquery unshare; do  # mail authentication cross-checks
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || { log "missing after install: $tool"; exit 1; }
done

bash "$here/scripts/deps-oauth2.sh"  # XOAUTH2 relay tests: dovecot-submissiond, npm oidc-provider
bash "$here/scripts/deps-dane.sh"  # unbound for the DANE tests (tests/tlspolicy/)
bash "$here/scripts/deps-clamav.sh"  # clamd for the malware tests (tests/malware/test_clamd_real.py)
bash "$here/scripts/deps-archives.sh"  # libarchive for RAR attachments (tests/malware/test_archive_formats.py)
bash "$here/scripts/deps-milter.sh"  # OpenDKIM and clamav-milter for the milter tests (tests/milter/)
bash "$here/scripts/deps-rspamd.sh"  # rspamd for the spam tests (tests/spam/test_rspamd_real.py)

# exmta itself, editable (compat mode) with the [test] extras, in ./.venv
# (scripts/install.sh; Debian's python3 is "externally managed", PEP 668)
PYTHON="$PYTHON" timeout 900 bash "$here/scripts/install.sh" test
VPY="$here/.venv/bin/python"

# twistd must discover the plugin from this tree
(
    cd /
    "$VPY" - "$here" <<'EOF'
import sys
from pathlib import Path

import twisted.plugins

want = Path(sys.argv[1]).resolve() / "twisted" / "plugins"
paths = [Path(p).resolve() for p in twisted.plugins.__path__]
if want not in paths:
    sys.exit(f"twisted.plugins.__path__ lacks {want}: {paths}")
if not (want / "exmta_plugin.py").exists():
    sys.exit(f"{want}/exmta_plugin.py is missing")
print("[install-test-deps] twisted plugin directory found:", want, file=sys.stderr)
EOF
)
if (cd / && "$VPY" -c 'import exmta.tap') >/dev/null 2>&1; then
    help="$(cd / && "$here/.venv/bin/twistd" --help)"
    if ! grep -qw exmta <<<"$help"; then
        log "twistd --help does not list exmta"
        exit 1
    fi
    log "twistd lists exmta"
else
    log "exmta.tap not importable yet: twistd exmta will work once it exists"
fi
log "done"
