"""Public helpers for tests, including third-party filter plugins' tests.

``FilterHarness`` runs a filter phase on a Clock; ``MessageView`` builds
the message a filter sees at end of data from bytes; ``RuleHarness`` runs
transport rules (and third-party rule extensions) on a message.
"""
from exmta.testing.filters import FilterHarness, HarnessEnv, MessageView
from exmta.testing.rules import RuleHarness

__all__ = ["FilterHarness", "HarnessEnv", "MessageView", "RuleHarness"]
