"""Findings of ``exmta diagnose``: a verdict per check, a table or JSON, an exit status for monitoring."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["EXIT", "Finding", "Findings"]

#: exit status: Nagios/Icinga plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)
EXIT = {"ok": 0, "warning": 1, "error": 2, "unknown": 3}


@dataclass(frozen=True)
class Finding:
    check: str        # "MX", "SPF", "TLS certificate", ...
    status: str       # "ok" | "warning" | "error"
    detail: str
    fix: str = ""
    code: str = ""    # a stable identifier for monitoring rules, e.g. "spf-lookup-limit"

    def to_json(self) -> dict[str, Any]:
        out = {"check": self.check, "status": self.status, "detail": self.detail}
        if self.fix:
            out["fix"] = self.fix
        if self.code:
            out["code"] = self.code
        return out


@dataclass
class Findings:
    """What one ``diagnose`` run found about ``target``."""

    target: str
    items: list[Finding] = field(default_factory=list)

    def ok(self, check: str, detail: str, code: str = "") -> None:
        self.items.append(Finding(check, "ok", detail, code=code))

    def warning(self, check: str, detail: str, fix: str = "", code: str = "") -> None:
        self.items.append(Finding(check, "warning", detail, fix, code))

    def error(self, check: str, detail: str, fix: str = "", code: str = "") -> None:
        self.items.append(Finding(check, "error", detail, fix, code))

    def extend(self, other: Findings) -> None:
        self.items.extend(other.items)

    def count(self, status: str) -> int:
        return sum(1 for f in self.items if f.status == status)

    def codes(self, status: str | None = None) -> set[str]:
        return {f.code for f in self.items if f.code and (status is None or f.status == status)}

    @property
    def verdict(self) -> str:
        if self.count("error"):
            return "error"
        if self.count("warning"):
            return "warning"
        return "ok"

    @property
    def exit_status(self) -> int:
        return EXIT[self.verdict]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "verdict": self.verdict, "errors": self.count("error"),
                "warnings": self.count("warning"), "findings": [f.to_json() for f in self.items]}

    def write(self, out: TextIO, as_json: bool = False) -> None:
        if as_json:
            out.write(json.dumps(self.to_json(), indent=2) + "\n")
            return
        width = max([len(f.check) for f in self.items] + [5])
        out.write(f"{self.target}\n")
        for f in self.items:
            out.write(f"  {f.status.upper():<8}{f.check:<{width}}  {f.detail}\n")
            if f.fix:
                out.write(f"  {'':<8}{'':<{width}}  fix: {f.fix}\n")
        out.write(f"{self.verdict.upper()}: {self.count('error')} error(s), {self.count('warning')} warning(s)\n")
