"""The PostgreSQL store's timers: lease renewal, the node's heartbeat (and drain state) and the poll."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from exmta.queue.postgres import PostgresStore

__all__ = ["PostgresService"]


class PostgresService(MultiService):
    """Opens the pool and threads at start; renews leases, beats the heart and polls for due mail."""

    def __init__(self, store: PostgresStore) -> None:
        super().__init__()
        self.store = store
        self.draining = False
        self.last_beat: float | None = None
        for name, interval, call in (
            ("leases", max(1.0, store.lease / 3), self._renew),
            ("heartbeat", 5.0, self._beat),
            ("poll", store.poll_interval, lambda: store._notify("")),
        ):
            timer = TimerService(interval, call)
            timer.clock = store._clock
            timer.setName(name)
            timer.setServiceParent(self)

    def _renew(self) -> Deferred[Any]:
        return self.store.renew_leases().addErrback(
            lambda f: self.store.log.warn("lease renewal failed: {error}", error=f.getErrorMessage()))

    def _beat(self) -> Deferred[Any]:
        def done(draining: bool) -> None:
            self.last_beat = self.store._clock.seconds()
            if draining != self.draining:
                self.store.log.info("node {node} {what} (exmta cluster {verb})", node=self.store.node,
                                    what="draining: /readyz fails" if draining else "back in service",
                                    verb="drain" if draining else "undrain")
            self.draining = draining

        def failed(f: Any) -> None:
            self.store.log.warn("heartbeat failed: {error}", error=f.getErrorMessage())
        return self.store.heartbeat().addCallbacks(done, failed)

    def readiness(self) -> tuple[bool, str]:
        """/readyz: not ready while draining or while the database has not answered a heartbeat lately."""
        if self.draining:
            return False, f"node {self.store.node} is draining (exmta cluster undrain {self.store.node})"
        if self.last_beat is None:
            return False, "no heartbeat stored in PostgreSQL yet"
        age = self.store._clock.seconds() - self.last_beat
        if age > max(15.0, self.store.lease / 2):
            return False, f"PostgreSQL has not stored a heartbeat for {age:.0f}s"
        return True, f"PostgreSQL heartbeat {age:.0f}s ago"

    def startService(self) -> None:
        self.store.open()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """Stopped after the scheduler: hand back whatever it left claimed, then close."""
        super().stopService()

        def close(result: Any) -> Any:
            self.store.close()
            return result

        def failed(f: Any) -> None:
            self.store.log.warn("could not hand back leases at stop ({error}); they expire in {lease}s",
                                error=f.getErrorMessage(), lease=self.store.lease)
        return self.store.release_leases().addErrback(failed).addBoth(close)
