"""The configuration reader and its converters, shared by every section of the TOML file.

:class:`Reader` walks one table: ``get`` converts a key (a converter raises ``ValueError`` or
``TypeError`` with a message; the reader records it as ``path.key: message`` and uses the
default), ``sub`` reads a nested table, ``error`` records a problem and ``finish`` reports every
key nobody read. Each area reads its own section with it (``exmta.auth.config``,
``exmta.tls.config``, ...) and :mod:`exmta.config.load` puts the sections together; filter
plugins read their options with it too (docs/filters.rst). This module imports nothing of
exmta, so any module may use it.
"""
from __future__ import annotations

import ipaddress
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from twisted.internet import endpoints as _twisted_endpoints

__all__ = [
    "ConfigError", "Reader", "boolean", "choice", "cidr", "config_base", "config_path", "domain", "endpoint",
    "endpoints", "integer", "known_keys", "list_of", "nameserver", "nonempty_string", "parse_duration", "parse_size",
    "paths_relative_to", "readable_file", "relative_note", "relative_paths_note", "resolve_path", "string",
]


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the configuration:\n{lines}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DOMAIN = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_ENDPOINT_KINDS = {"tcp", "tcp6", "unix", "ssl", "haproxy", "systemd"}


def known_keys(config: Any, known: Any) -> None:
    """A plugin's options table: ValueError naming every unknown key and listing the known ones."""
    unknown = set(config) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")


def parse_duration(value: Any) -> float:
    """``30``, ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\" or \"4h\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30, \"30s\", \"5m\" or \"4h\", not {value!r}")


def parse_size(value: Any) -> int:
    """``1048576``, ``"35MiB"``, ``"10MB"`` -> octets."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760 or \"10MiB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "B").lower()
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 10485760 or \"10MiB\", not {value!r}")


class Reader:
    """Walks one TOML table, converting values and remembering every problem.

    ``problems`` is shared with the readers of the enclosing and nested tables, so one pass
    collects every problem of the file; ``path`` ("receive.default") prefixes each one.
    """

    def __init__(self, problems: list[str], path: str, table: Any) -> None:
        self.problems = problems
        self.path = path
        if not isinstance(table, dict):
            self.error("", f"must be a table, not {type(table).__name__}")
            table = {}
        self.table = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> None:
        where = self.key(name) if name else self.path
        self.problems.append(f"{where}: {message}")

    def get(self, name: str, default: Any, convert: Callable[[Any], Any]) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        try:
            return convert(self.table[name])
        except (ValueError, TypeError) as e:
            self.error(name, str(e))
            return default

    def sub(self, name: str) -> Reader:
        self.used.add(name)
        return Reader(self.problems, self.key(name), self.table.get(name, {}))

    def finish(self) -> None:
        for name in sorted(set(self.table) - self.used):
            self.error(name, "unknown setting (check the spelling; etc/exmta.toml lists every setting)")

    def check(self) -> None:
        """``finish``, then raise ValueError naming every problem (for a plugin's own options)."""
        self.finish()
        if self.problems:
            raise ValueError("; ".join(self.problems))


# ---------------------------------------------------------------- converters


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, not {type(v).__name__} {v!r}")
    return v


def nonempty_string(v: Any) -> str:
    s = string(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, not {v!r}")
    return v


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    """A whole number from ``minimum`` to ``maximum`` (None: no upper bound)."""
    def convert(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected a whole number, not {v!r}")
        if v < minimum:
            raise ValueError(f"must be at least {minimum}, not {v}")
        if maximum is not None and v > maximum:
            raise ValueError(f"must be at most {maximum}, not {v}")
        return v

    return convert


def choice(*choices: str) -> Callable[[Any], str]:
    """One of ``choices``."""
    def convert(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}")
        return v

    return convert


def list_of(convert: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    """A list whose items ``convert`` accepts -> a tuple; every bad item is named."""
    def convert_list(v: Any) -> tuple:
        if not isinstance(v, list):
            raise TypeError(f"expected a list, not {type(v).__name__} {v!r}")
        out, errors = [], []
        for i, item in enumerate(v):
            try:
                out.append(convert(item))
            except (ValueError, TypeError) as e:
                errors.append(f"item {i + 1} ({item!r}): {e}")
        if errors:
            raise ValueError("; ".join(errors))
        return tuple(out)

    return convert_list


def domain(v: Any) -> str:
    """A domain name or ``*.domain`` pattern (or ``*``), lower case, IDNA-encoded."""
    s = string(v).strip().lower().rstrip(".")
    if s == "*":
        return s
    try:
        ascii_form = s.encode("idna").decode("ascii") if not s.isascii() else s
    except UnicodeError:
        raise ValueError(f"{v!r} is not a valid domain name") from None
    if not _DOMAIN.match(ascii_form):
        raise ValueError(f"{v!r} is not a domain name (use \"example.com\" or \"*.example.com\")")
    return ascii_form


def cidr(v: Any) -> str:
    """An IP network ("192.0.2.0/24"; host bits allowed) in its normal form."""
    s = string(v)
    try:
        return str(ipaddress.ip_network(s, strict=False))
    except ValueError:
        raise ValueError(f"{s!r} is not an IP network such as \"192.0.2.0/24\" or \"2001:db8::/32\"") from None


def nameserver(v: Any) -> str:
    """An IP address, optionally with ``:port``."""
    s = nonempty_string(v)
    host = s.rsplit(":", 1)[0] if s.count(":") == 1 else s
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address (optionally with :port)") from None
    return s


# ---------------------------------------------------------------- paths

# the directory of the file being read: relative paths in it are relative to this (None: the current directory)
_CONFIG_DIR: ContextVar[str | None] = ContextVar("exmta_config_dir", default=None)


def config_base(source: str) -> str | None:
    """The directory relative paths of ``source`` are resolved against (None when it is not a file)."""
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None


@contextmanager
def paths_relative_to(source: str) -> Iterator[None]:
    """While reading ``source``, relative paths are relative to its directory."""
    token = _CONFIG_DIR.set(config_base(source))
    try:
        yield
    finally:
        _CONFIG_DIR.reset(token)


def resolve_path(value: str) -> str:
    """``value`` made absolute against the configuration file's directory (as auth_backend always was)."""
    if os.path.isabs(value):
        return value
    base = _CONFIG_DIR.get()
    return os.path.normpath(os.path.join(base, value)) if base else os.path.abspath(value)


def relative_note(value: str) -> str:
    """Says what a relative path was resolved against, for error texts."""
    if os.path.isabs(value):
        return ""
    base = _CONFIG_DIR.get()
    where = f"the configuration file's directory {base}" if base else f"the current directory {os.getcwd()}"
    return f" ({value!r} is relative to {where})"


def relative_paths_note() -> str:
    """For a missing file's error text: what relative paths in this file are relative to."""
    base = _CONFIG_DIR.get()
    where = f"the configuration file's directory {base}" if base else f"the current directory {os.getcwd()}"
    return f" (relative paths are relative to {where})"


def config_path(v: Any) -> str:
    """A path setting: relative paths are relative to the configuration file's directory."""
    return resolve_path(nonempty_string(v))


def readable_file(v: Any) -> str:
    """A path setting naming a file that exists and can be read now."""
    s = nonempty_string(v)
    path = resolve_path(s)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: the file does not exist{relative_note(s)}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: the file cannot be read{relative_note(s)}")
    return path


# ---------------------------------------------------------------- endpoints


class _NoReactor:
    """Stands in for a reactor so endpoint strings can be parsed without one."""


def endpoint(v: Any) -> str:
    """A Twisted server endpoint string, checked by Twisted's own parser."""
    s = nonempty_string(v)
    kind = s.split(":", 1)[0]
    if kind not in _ENDPOINT_KINDS:
        raise ValueError(f"{s!r}: endpoint kind {kind!r} is not one of {', '.join(sorted(_ENDPOINT_KINDS))}")
    try:
        _twisted_endpoints.serverFromString(_NoReactor(), s)
    except Exception as e:  # the parser raises many types; all mean the same here
        raise ValueError(f"{s!r} is not a valid endpoint: {e}") from None
    return s


def endpoints(v: Any) -> tuple[str, ...]:
    """A ``listen`` setting: one endpoint string or a list of them, the same form everywhere."""
    return (endpoint(v),) if isinstance(v, str) else list_of(endpoint)(v)
