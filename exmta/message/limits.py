"""Hard limits on inspecting one message, and the mark a message gets when it passes one.

A message that passes a limit is never a crash or a hang: inspection stops,
and the message is marked "could not be inspected" (Exchange's
``AttachmentProcessingLimitExceeded`` / ``AttachmentIsUnsupported``), which a
transport rule can test and act on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["InspectionBudget", "LimitExceeded", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-message ceilings. The defaults suit a 36 MB Exchange-sized message."""

    max_depth: int = 30                       #: nested multiparts and message/rfc822 levels
    max_parts: int = 2000                     #: MIME entities in the whole tree
    max_decoded_size: int = 200 * 1024 * 1024  #: octets decoded from all parts together
    max_seconds: float = 20.0                 #: CPU-side wall time spent inspecting one message
    max_archive_ratio: float = 100.0          #: declared uncompressed / compressed size of an archive
    max_archive_size: int = 512 * 1024 * 1024  #: declared uncompressed size of one archive
    max_archive_members: int = 10_000         #: entries in one archive
    max_text: int = 1024 * 1024               #: characters of text extracted per part

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> Limits:
        """Limits from a TOML table, every key optional; unknown keys are a ValueError."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown limit(s): {', '.join(unknown)}")
        values = {}
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{key}: must be a positive number")
            values[key] = value
        return cls(**values)


class LimitExceeded(Exception):
    """Inspection stopped: ``reason`` says which limit (e.g. ``"max_depth 30"``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InspectionBudget:
    """What is left of the limits while one message is inspected (one per message, one thread)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.deadline = clock() + limits.max_seconds
        self.parts = 0
        self.decoded = 0

    def check_time(self) -> None:
        if self.clock() > self.deadline:
            raise LimitExceeded(f"max_seconds {self.limits.max_seconds:g}")

    def count_part(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise LimitExceeded(f"max_depth {self.limits.max_depth}")
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise LimitExceeded(f"max_parts {self.limits.max_parts}")
        self.check_time()

    def spend_decoded(self, octets: int) -> None:
        self.decoded += octets
        if self.decoded > self.limits.max_decoded_size:
            raise LimitExceeded(f"max_decoded_size {self.limits.max_decoded_size}")
