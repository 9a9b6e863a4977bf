"""Assembly-time checks that every provider provides the interface its consumer depends on.

The SMTP server and the scheduler call their collaborators (the authenticator,
the TLS gate, the protocol log, the session observer, the store, the send
connectors, ...) through the interfaces of :mod:`exmta.interfaces`. The
assembly (:mod:`exmta.assembly`) and the code that attaches a collaborator
later (metrics, protocol logs) run :func:`require` on each, so a provider that
lacks a method fails the start with its name, not a session with an
AttributeError hours later.
"""
from __future__ import annotations

from typing import Any, TypeVar

from zope.interface.exceptions import Invalid
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

__all__ = ["AssemblyError", "require"]

T = TypeVar("T")


class AssemblyError(TypeError):
    """A provider does not provide the interface it is wired in for (a bug or a bad plugin, not a bad file)."""


def _name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def require(interface: InterfaceClass, provider: T, role: str) -> T:
    """``provider`` if it declares and fully provides ``interface``; else AssemblyError naming ``role``."""
    try:
        verifyObject(interface, provider)
    except Invalid as e:
        reason = " ".join(str(e).split())
        raise AssemblyError(f"{role}: {_name(provider)} does not provide {interface.__name__}: {reason}") from None
    return provider
