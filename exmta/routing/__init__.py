"""Routing: which send connector and next hop each recipient goes to."""
from exmta.routing.router import UNREACHABLE, StaticRouter

__all__ = ["StaticRouter", "UNREACHABLE"]
