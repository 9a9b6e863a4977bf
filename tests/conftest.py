"""Shared pytest configuration. Area fixtures live in tests/support/."""
import sys
from pathlib import Path

# tests/support is importable as ``support`` from every test module
sys.path.insert(0, str(Path(__file__).parent))

# integration fixtures (Postfix, Dovecot, aiosmtpd sinks, exmta as a process)
pytest_plugins = ["support.fixtures", "support.postgres"]
