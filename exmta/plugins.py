"""Find and build filter plugins named in the configuration.

Filters are discovered through the ``exmta.filters`` entry-point group (the
PyPA standard), and only the plugins that the configuration names are loaded.
Each factory must provide IFilterFactory and each instance IMessageFilter;
every failure is reported at once as a configuration problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from exmta.config.load import ConfigError
from exmta.interfaces import IFilterFactory, IMessageFilter

FILTER_GROUP = "exmta.filters"
# keys of a [filters.NAME] table that the core uses; the rest goes to the plugin
CORE_FILTER_KEYS = ("plugin", "timeout", "on_error")


@dataclass(frozen=True)
class FilterEnv:
    """What a filter factory may use: injected, so filters stay testable."""

    reactor: Any
    clock: Any
    threadpool: Any
    hostname: str
    data_dir: str


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def load_filters(
    specs: dict[str, dict[str, Any]],
    env: FilterEnv,
    source: str = "<config>",
    find: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Build every configured filter instance: ``{instance name: IMessageFilter}``.

    ``find`` maps a group to ``{plugin name: entry point or factory}`` (for tests).
    """
    available = (find or _entry_points)(FILTER_GROUP)
    problems: list[str] = []
    built: dict[str, Any] = {}
    for name, table in specs.items():
        plugin = table["plugin"]
        where = f"filters.{name}"
        target = available.get(plugin)
        if target is None:
            installed = ", ".join(sorted(available)) or "none"
            problems.append(f"{where}.plugin: no filter plugin {plugin!r} is installed (installed: {installed})")
            continue
        try:
            factory = target.load() if isinstance(target, EntryPoint) else target
        except Exception as e:
            problems.append(f"{where}.plugin: plugin {plugin!r} failed to import: {e!r}")
            continue
        if not IFilterFactory.providedBy(factory):
            problems.append(f"{where}.plugin: {plugin!r} does not provide IFilterFactory (add @provider(IFilterFactory))")
            continue
        config = {k: v for k, v in table.items() if k not in CORE_FILTER_KEYS}
        try:
            instance = factory.from_config(name, config, env)
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"{where}: {e}")
            continue
        try:
            verifyObject(IMessageFilter, instance)
        except Invalid as e:
            problems.append(f"{where}: plugin {plugin!r} built an object that is not an IMessageFilter: {e}")
            continue
        built[name] = instance
    if problems:
        raise ConfigError(source, problems)
    return built


def ordered(filters: dict[str, Any], names: Iterable[str]) -> list[Any]:
    """The filter instances a connector names, in its order."""
    return [filters[n] for n in names]
