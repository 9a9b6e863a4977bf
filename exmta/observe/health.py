"""``/healthz`` and ``/readyz`` for load balancers and orchestrators.

``/healthz`` answers 200 while the reactor turns (the process is alive).
``/readyz`` answers 200 only when the server should get traffic: it is
listening, the spool has been recovered, it is not stopping, the queue's
disk has more free space than the floor, and every receive worker process runs
(exmta.receive.workers); otherwise 503 with one line per
failed check, so that an operator reading it knows which one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from twisted.web import resource

__all__ = ["Check", "HealthResource", "ReadinessChecks", "ReadyResource", "disk_free"]


@dataclass(frozen=True)
class Check:
    """One readiness check: ``probe()`` -> (ok, detail)."""

    name: str
    probe: Callable[[], tuple[bool, str]]


def disk_free(path: str) -> int:
    """Octets available to unprivileged users on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class ReadinessChecks:
    """The checks behind ``/readyz``; ``evaluate()`` runs each and never raises."""

    def __init__(self, checks: list[Check] | None = None) -> None:
        self.checks = list(checks or [])

    def add(self, name: str, probe: Callable[[], tuple[bool, str]]) -> None:
        self.checks.append(Check(name, probe))

    def evaluate(self) -> tuple[bool, list[dict[str, Any]]]:
        results = []
        for check in self.checks:
            try:
                ok, detail = check.probe()
            except Exception as e:  # a broken probe means not ready, and says why
                ok, detail = False, f"check raised {type(e).__name__}: {e}"
            results.append({"check": check.name, "ok": bool(ok), "detail": detail})
        return all(r["ok"] for r in results), results

    @staticmethod
    def disk_floor(path: str, floor: int) -> Callable[[], tuple[bool, str]]:
        def probe() -> tuple[bool, str]:
            free = disk_free(path)
            return free >= floor, f"{free} octets free on {path}, floor {floor}"
        return probe


class HealthResource(resource.Resource):
    """``GET /healthz``: 200 ``ok`` (the process answers)."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class ReadyResource(resource.Resource):
    """``GET /readyz``: 200 when every check passes, else 503; ``?format=json`` for details."""

    isLeaf = True

    def __init__(self, checks: ReadinessChecks) -> None:
        super().__init__()
        self.checks = checks

    def render_GET(self, request: Any) -> bytes:
        ok, results = self.checks.evaluate()
        request.setResponseCode(200 if ok else 503)
        request.setHeader(b"cache-control", b"no-store")
        if request.args.get(b"format") == [b"json"]:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"ready": ok, "checks": results}).encode("utf-8") + b"\n"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        lines = ["ready" if ok else "not ready"]
        lines += [f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']}: {r['detail']}" for r in results]
        return ("\n".join(lines) + "\n").encode("utf-8")
