"""Third-party rule conditions and actions, found through the ``exmta.rules`` entry-point group.

Each entry point resolves to an :class:`~exmta.interfaces.IRuleExtension`
provider; its name is the key used in rules files. Discovery checks every
extension with zope's ``verifyObject`` and reports a broken one by name
instead of failing later, mid-message. See docs/rules.rst for a worked example.
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from exmta.interfaces import IRuleExtension
from exmta.rules.actions import plugin_action
from exmta.rules.conditions import plugin_condition

__all__ = ["RULES_GROUP", "discover", "plugin_action", "plugin_condition"]

RULES_GROUP = "exmta.rules"


def discover(find: Callable[[str], dict[str, Any]] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({"condition": {key: ext}, "action": {key: ext}}, problems) for every installed extension."""
    available = find(RULES_GROUP) if find else {ep.name: ep for ep in entry_points(group=RULES_GROUP)}
    found: dict[str, dict[str, Any]] = {"condition": {}, "action": {}}
    problems: list[str] = []
    for name, target in sorted(available.items()):
        try:
            ext = target.load() if isinstance(target, EntryPoint) else target
            verifyObject(IRuleExtension, ext)
        except Invalid as e:
            problems.append(f"rule extension {name!r} does not provide IRuleExtension: {e}")
            continue
        except Exception as e:
            problems.append(f"rule extension {name!r} failed to import: {e!r}")
            continue
        if ext.kind not in found:
            problems.append(f"rule extension {name!r}: kind must be 'condition' or 'action', not {ext.kind!r}")
            continue
        found[ext.kind][name] = ext
    return found, problems
