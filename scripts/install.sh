#!/usr/bin/env bash
# Installs exmta into ./.venv (a virtualenv beside the checkout), idempotently.
# Usage: bash scripts/install.sh [EXTRAS]     e.g. bash scripts/install.sh test
# EXTRAS defaults to "metrics": [metrics] enabled = true is the default and needs prometheus-client
# ("test" includes it).
# Debian's python3 is "externally managed" (PEP 668), so exmta gets its own venv.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
extras="${1:-metrics}"
py="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
fi
if [ ! -x "$here/.venv/bin/python" ]; then
    "$py" -m venv "$here/.venv"
fi
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/exmta_plugin.py
"$here/.venv/bin/python" -m pip install -q --disable-pip-version-check \
    -e "$spec" --config-settings editable_mode=compat
# (capture first: grep -q closing the pipe early would fail the pipeline under pipefail)
twistd_help="$(cd / && "$here/.venv/bin/twistd" --help)"
grep -q '^ *exmta ' <<<"$twistd_help" || {
    echo "install.sh: twistd does not list the exmta plugin" >&2; exit 1; }
echo "exmta installed in $here/.venv"
