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

from exmta.config.reader import ConfigError
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
            problems.append(
                f"{where}.plugin: {plugin!r} does not provide IFilterFactory (add @provider(IFilterFactory))")
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


def check_filters(
    specs: dict[str, dict[str, Any]],
    hostname: str,
    data_dir: str,
    find: Callable[[str], dict[str, Any]] | None = None,
) -> list[str]:
    """Problems of the configured filters, as ``exmta check-config`` and ``twistd exmta --check`` see them.

    Each plugin is found and imported. A factory with a ``check_config(name, config)``
    hook (raising ValueError, TypeError or KeyError for a bad key) is asked
    that; any other is built once with an environment whose reactor never
    runs and whose thread pool is never started, and the result verified,
    exactly as at start.
    """
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    env = FilterEnv(reactor=reactor, clock=reactor, threadpool=ThreadPool(0, 1, name="exmta-check"),
                    hostname=hostname, data_dir=data_dir)
    hooked: dict[str, dict[str, Any]] = {}
    built: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    available = (find or _entry_points)(FILTER_GROUP)
    for name, table in specs.items():
        target = available.get(table["plugin"])
        try:
            factory = target.load() if isinstance(target, EntryPoint) else target
        except Exception:
            factory = None  # load_filters below reports it
        check = getattr(factory, "check_config", None) if IFilterFactory.providedBy(factory) else None
        (hooked if callable(check) else built)[name] = table
    for name, table in hooked.items():
        factory = available[table["plugin"]]
        factory = factory.load() if isinstance(factory, EntryPoint) else factory
        try:
            factory.check_config(name, {k: v for k, v in table.items() if k not in CORE_FILTER_KEYS})
        except (ValueError, TypeError, KeyError) as e:
            problems.append(f"filters.{name}: {e}")
    try:
        load_filters(built, env, find=lambda group: available)
    except ConfigError as e:
        problems += e.problems
    return problems


def ordered(filters: dict[str, Any], names: Iterable[str]) -> list[Any]:
    """The filter instances a connector names, in its order."""
    return [filters[n] for n in names]
