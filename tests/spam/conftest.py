"""One real rspamd for the spam tests of a session (a cold start compiles hyperscan databases)."""
from __future__ import annotations

from pathlib import Path

import pytest

from support import rspamd as rspamd_support


@pytest.fixture(scope="session")
def hs_cache(request, tmp_path_factory) -> Path:
    """rspamd's compiled hyperscan files: the first start writes them, later starts copy them (about 1 s)."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("rspamd-hs")) if cache is not None else tmp_path_factory.mktemp("rspamd-hs")


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory, hs_cache):
    if not rspamd_support.available():
        pytest.skip("rspamd is not installed (scripts/deps-rspamd.sh)")
    server = rspamd_support.Rspamd(tmp_path_factory.mktemp("rspamd"), cache_dir=hs_cache).start()
    yield server
    server.close()
