"""Shared pytest configuration. Area fixtures live in tests/support/."""
import sys
from pathlib import Path

# tests/support is importable as ``support`` from every test module
sys.path.insert(0, str(Path(__file__).parent))

# integration fixtures (Postfix, Dovecot, aiosmtpd sinks, exmta as a process)
pytest_plugins = ["support.fixtures", "support.postgres"]

_OWN_BASETEMP_PREFIX = "exmta-tests-"
_KEEP_FINISHED = 2  # the newest finished sessions' temp roots are kept for a look after a failure


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    """Give this session a temp root of its own under /tmp, unless --basetemp was given.

    Daemons that drop privileges (Postfix, Dovecot, twistd --uid) must traverse the test's
    directory, so tests open its parents to "others" (support.procs.make_traversable). Under
    pytest's shared /tmp/pytest-of-USER, any other pytest session that starts meanwhile closes
    that directory again (pytest resets it to 0700), and the daemon gets EACCES mid-test.
    Each root holds a lock while its session runs; only unlocked (finished) roots are removed.
    """
    import fcntl
    import os
    import shutil
    import tempfile

    if config.option.basetemp:
        return
    top = Path(tempfile.gettempdir())
    finished = []
    for old in top.glob(_OWN_BASETEMP_PREFIX + "*"):
        try:
            fd = os.open(old / ".lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finished.append((old.stat().st_mtime, old))
        except OSError:
            pass  # a running session
        finally:
            os.close(fd)
    for _, old in sorted(finished)[:-_KEEP_FINISHED or None]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=_OWN_BASETEMP_PREFIX))
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held (fd left open) until this process ends
    config._exmta_basetemp_lock = fd
    config.option.basetemp = str(root / "t")
