"""Message filters: the base class, the chain that runs them and the message view."""
from exmta.filters.base import FilterBase, FilterChain, HeaderEdits, MessageView

__all__ = ["FilterBase", "FilterChain", "HeaderEdits", "MessageView"]
