#!/usr/bin/env bash
# Test dependencies of the XOAUTH2 relay (tests/send/test_xoauth2_*.py), idempotent, run as root:
#   Debian: dovecot-submissiond (the next hop that validates XOAUTH2 by introspection), nodejs + npm
#   npm:    oidc-provider (the OAuth2 token endpoint), into tests/support/oidc/node_modules
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "[deps-oauth2] $*" >&2; }

missing=""
for p in dovecot-core dovecot-submissiond; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -n "$missing" ]; then
    log "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing
fi
[ -x /usr/lib/dovecot/submission ] || { log "missing after install: /usr/lib/dovecot/submission"; exit 1; }

oidc="$here/tests/support/oidc"
if [ ! -f "$oidc/node_modules/oidc-provider/package.json" ]; then
    log "npm ci in $oidc"
    (cd "$oidc" && timeout 600 npm ci --no-audit --no-fund --loglevel=error)
fi
node -e "require('$oidc/node_modules/oidc-provider/package.json')" \
    || { log "oidc-provider is not installed in $oidc"; exit 1; }
log "done"
