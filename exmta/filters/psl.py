"""The organisational domain (RFC 7489 3.2) from a packaged public suffix list.

The list shipped with the ``publicsuffixlist`` package is used unless a
refreshed copy exists at ``<data>/public_suffix_list.dat`` (written by
``exmta psl refresh``, only when an operator asks; nothing is fetched at
run time). Unknown TLDs count as public suffixes (the ``*`` default rule).
"""
from __future__ import annotations

import os
import threading
import urllib.request
from typing import Any

__all__ = ["PSL_URL", "load", "org_domain", "refresh", "use_data_dir"]

PSL_URL = "https://publicsuffix.org/list/public_suffix_list.dat"
FILENAME = "public_suffix_list.dat"

_lock = threading.Lock()
_psl: Any = None
_source: str | None = None


def use_data_dir(data_dir: str) -> None:
    """Prefer ``<data_dir>/public_suffix_list.dat`` when it exists (call before the first lookup)."""
    global _psl, _source
    path = os.path.join(data_dir, FILENAME)
    with _lock:
        if os.path.exists(path) and _source != path:
            _psl, _source = None, path


def load() -> Any:
    """The PublicSuffixList in use (loaded once)."""
    global _psl
    with _lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList

            if _source:
                with open(_source, "rb") as f:
                    _psl = PublicSuffixList(f)
            else:
                _psl = PublicSuffixList()
        return _psl


def org_domain(domain: str) -> str:
    """The organisational domain: one label below the longest public suffix (the domain if none)."""
    domain = domain.lower().rstrip(".")
    found = load().privatesuffix(domain)
    return found or domain


def refresh(data_dir: str, url: str = PSL_URL, timeout: float = 30.0) -> str:
    """Download the list to ``<data_dir>/public_suffix_list.dat`` (atomic); returns the path.

    Only the ``exmta psl refresh`` command calls this.
    """
    path = os.path.join(data_dir, FILENAME)
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (operator-given URL)
        data = response.read(16 * 1024 * 1024)
    if b"// ===BEGIN ICANN DOMAINS===" not in data:
        raise ValueError(f"{url} does not look like the public suffix list")
    os.makedirs(data_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
