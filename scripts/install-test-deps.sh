#!/usr/bin/env bash
# Installs everything the test suite needs on a Debian 12 machine (run as root).
# Idempotent: packages already present are skipped quickly by apt and pip.
#
#   Debian: postfix (also provides smtp-source / smtp-sink), swaks, knot,
#           knot-dnsutils, dovecot-core, dovecot-lmtpd, openssl
#   Python: this repository, editable, with the [test] extras, in "compat"
#           editable mode so the repository root is on sys.path and
#           `twistd exmta` finds twisted/plugins/exmta_plugin.py in the tree.
#
# Environment: PYTHON (default python3) is the interpreter that gets the
# packages; it must be the one that later runs `python3 -m pytest`.
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
# a clean Debian 12 has python3 without pip
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    debs="$debs python3-pip python3-venv"
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

# the tools the tests and benchmarks call directly
for tool in postfix postconf postqueue smtp-source smtp-sink swaks dovecot knotd kdig openssl; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing after install: $tool"; exit 1; }
done
[ -x /usr/lib/dovecot/lmtp ] || { log "missing after install: /usr/lib/dovecot/lmtp"; exit 1; }

# Debian's own python3 is "externally managed" (PEP 668); CI installs into it anyway.
pip_flags=(-q --disable-pip-version-check --root-user-action=ignore)
if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")))' \
    && [ -z "${VIRTUAL_ENV:-}" ]; then
    pip_flags+=(--break-system-packages)
fi
# compat mode: a plain .pth with the repo root (a strict PEP 660 editable
# install hides the twisted/plugins directory from twisted.plugin).
timeout 900 "$PYTHON" -m pip install "${pip_flags[@]}" \
    --config-settings editable_mode=compat -e "$here[test]"

# twistd must discover the plugin from this tree
(
    cd /
    "$PYTHON" - "$here" <<'EOF'
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
if "$PYTHON" -c 'import exmta.tap' >/dev/null 2>&1; then
    if ! (cd / && "$PYTHON" -c 'from twisted.scripts.twistd import run; import sys; sys.argv[0] = "twistd"; run()' --help) \
            | grep -qw exmta; then
        log "twistd --help does not list exmta"
        exit 1
    fi
    log "twistd lists exmta"
else
    log "exmta.tap not importable yet: twistd exmta will work once it exists"
fi
log "done"
