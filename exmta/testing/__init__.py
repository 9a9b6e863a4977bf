"""Public helpers for tests, including third-party filter plugins' tests.

``FilterHarness`` runs a filter phase on a Clock; ``MessageView`` builds
the message a filter sees at end of data from bytes.
"""
from exmta.testing.filters import FilterHarness, HarnessEnv, MessageView

__all__ = ["FilterHarness", "HarnessEnv", "MessageView"]
