#!/usr/bin/env bash
# libarchive for reading RAR attachments (exmta/malware/archive_formats.py, through the libarchive-c
# Python package of the [archives] and [test] extras): run as root. Debian 12 usually has
# libarchive13 already; 7z needs nothing from Debian (py7zr is pure Python).
set -euo pipefail
if ! dpkg-query -W -f='${Status}' libarchive13 2>/dev/null | grep -q "install ok installed"; then
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get -o DPkg::Lock::Timeout=600 update -qq  # a fresh machine has no package lists yet
    timeout 1200 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends libarchive13
fi
