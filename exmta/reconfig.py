"""What a live reconfiguration of one service did: applied, needs a restart, and the step that applies it.

A long-lived service that can take a new configuration while it runs
provides :class:`~exmta.interfaces.IReconfigurable` (buildbot's
``reconfigServiceWithBuildbotConfig``): ``prepare_reconfigure`` builds every
new object and returns a :class:`Reconfiguration` without changing anything,
so SIGHUP (:mod:`exmta.observe.reload`) can prepare every service before it
applies any, all or nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Reconfiguration"]


def _nothing() -> None:
    return None


@dataclass
class Reconfiguration:
    """``applied``: what ``apply()`` changes (or changed), one line each; ``needs_restart``: the settings that
    changed but keep their old value until a restart. ``apply`` swaps the prepared objects in and does not fail."""

    service: str
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    apply: Callable[[], None] = _nothing

    @property
    def changed(self) -> bool:
        """Did the new configuration differ in anything this service looks at."""
        return bool(self.applied or self.needs_restart)

    def describe(self) -> str:
        """One line for the log."""
        if not self.changed:
            return f"{self.service}: nothing to change"
        parts = [*self.applied]
        if self.needs_restart:
            parts.append("needs a restart to take effect (the old values stay in use): "
                         + ", ".join(self.needs_restart))
        return f"{self.service}: " + "; ".join(parts)
