"""SIGHUP: reload the configuration file without dropping a connection or a message.

The new file is read and validated first; a configuration with any problem
is refused as a whole, the running one stays, and the log says every
reason (the same text as ``twistd exmta --check``).

What a valid new configuration changes at once:

* routes: a new router for the scheduler; deliveries already routed keep
  their route;
* queue settings (retry schedule, lifetime, delay warning, active window,
  poison threshold): the scheduler's next decisions use them. (Both through
  the scheduler's ``prepare_reconfigure``, exmta.interfaces.IReconfigurable.)
* receive connectors (same name): policy (accepted domains, relay networks,
  permissions, rate limits, which restart counting), filter chain and
  session limits, for sessions from their next command on;
* alert rules and intervals.

What needs a restart, and is logged as such (the old value stays in use):
listen endpoints, added or removed receive connectors, send connectors,
receive workers, data and log paths, TLS settings other than the
certificate files (those are reloaded by exmta.tls on the same signal),
AUTH settings (turning AUTH on or off included), protocol logs and the
pickup interval: every one that
changed is named in the log line.

All or nothing: every new object (filter plugins first, then router,
policies and filter chains) is built before the first one is swapped in, so
a plugin that cannot be built changes nothing. Only then does the main
process send SIGHUP to each receive worker (exmta.receive.workers), which
runs this same reloader on its own receive side, built by the same
functions (exmta.assembly), and logs what it applied under its own name.

The previous SIGHUP handler (e.g. the TLS certificate reloader) still runs.
"""
from __future__ import annotations

import dataclasses
import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["ConfigReloader", "ReloadService"]

log = Logger()

_RESTART_SERVER_KEYS = ("data_dir", "pickup_dir", "tracking_log", "receive_workers", "spool_io", "spool_sync",
                        "receive_worker_nice", "hostname", "postmaster", "recipient_list", "back_pressure",
                        "dkim_keys", "auth_backends", "logs", "admin")
# receive connector settings built into objects at start (listeners, TLS, the authenticator, protocol
# logs): a reload names each one that changed. (remote_ranges and connection limits do apply: the
# dispatcher reads them from the factory's config at the next connection.)
RESTART_RECEIVE_KEYS = ("listen", "tls", "require_tls", "auth", "auth_backend", "auth_before_tls_networks",
                        "auth_tarpit", "auth_lockout_source_failures", "auth_lockout_user_failures",
                        "auth_lockout_window", "auth_lockout_duration", "accept_any_sender", "protocol_log")


class ConfigReloader:
    """Applies a new configuration to the running objects; ``reload()`` -> (applied, messages).

    The same class runs in the main process and in every receive worker
    (``process`` names which in the log). ``workers`` (exmta.receive.workers.WorkerPool)
    is asked to reload once this process has applied the new file, never before.
    """

    def __init__(self, config: Any, reactor: Any, *, scheduler: Any = None, factories: dict[str, Any] | None = None,
                 filters: dict[str, Any] | None = None, filter_env: Any = None, observability: Any = None,
                 data_dir: str | None = None, workers: Any = None, resources: Any = None,
                 process: str = "the main process") -> None:
        self.config = config
        self.filters = dict(filters or {})
        self.reactor = reactor
        self.scheduler = scheduler
        self.factories = dict(factories or {})
        self.filter_env = filter_env
        self.observability = observability
        self.data_dir = data_dir
        self.workers = workers
        self.resources = resources  # exmta.receive.wiring.ReceiveResources of the process: policies rebuilt on them
        self.process = process
        self.reloads = 0
        self.refused = 0
        self._pending_filters: dict[str, Any] | None = None

    def load(self) -> Any:
        from exmta.config.load import load_config

        return load_config(self.config.source, data_dir=self.data_dir or self.config.data_dir)

    def reload(self) -> tuple[bool, list[str]]:
        """Read the file again and apply what can be applied, all or nothing; never raises."""
        from exmta.config.load import ConfigError

        source = self.config.source
        try:
            new = self.load()
        except ConfigError as e:
            self.refused += 1
            log.error("SIGHUP: {source} refused, the running configuration stays:\n{problems}",
                      source=source, problems="\n".join(f"  - {p}" for p in e.problems), process=self.process)
            return False, list(e.problems)
        except Exception as e:
            self.refused += 1
            log.failure("SIGHUP: reading {source} failed; the running configuration stays", source=source)
            return False, [str(e)]
        try:
            steps, messages = self.prepare(new)
        except ConfigError as e:  # e.g. a filter plugin that cannot be built: nothing was swapped
            self.refused += 1
            log.error("SIGHUP: {source} refused in {process}, nothing changed:\n{problems}",
                      source=source, process=self.process, problems="\n".join(f"  - {p}" for p in e.problems))
            return False, list(e.problems)
        except Exception as e:
            self.refused += 1
            log.failure("SIGHUP: building {source} failed in {process}; nothing changed", source=source,
                        process=self.process)
            return False, [str(e)]
        try:
            for step in steps:
                messages += step() or []
        except Exception:
            self.refused += 1
            log.failure("SIGHUP: applying {source} failed part way; restart exmta to be sure of its state",
                        source=source)
            return False, ["applying failed; see the log"]
        self.reloads += 1
        old_workers = self.config.receive_workers
        self.config = new
        if self._pending_filters is not None:
            self.filters, self._pending_filters = self._pending_filters, None
        if self.workers is not None:
            asked = self.workers.reload()
            if asked:
                messages.append(f"asked the {asked} receive worker process(es) to apply the same file; "
                                "each logs what it applied")
        elif old_workers and messages and self.scheduler is not None:
            messages.append(f"the {old_workers} receive worker process(es) keep the configuration they "
                            "started with until a restart")
        for m in messages:
            log.info("SIGHUP: {message}", message=m, process=self.process)
        log.info("SIGHUP: {source} reloaded ({count} change(s) reported) in {process}", source=source,
                 count=len(messages), process=self.process)
        return True, messages

    def apply(self, new: Any) -> list[str]:
        """Build everything ``new`` needs, then swap it in; -> the messages. (prepare + commit.)"""
        steps, out = self.prepare(new)
        for step in steps:
            out += step() or []
        return out

    def prepare(self, new: Any) -> tuple[list[Any], list[str]]:
        """Build every new object for ``new`` and change nothing: -> (steps that swap them in, messages).

        Anything that fails here (a filter plugin that cannot be built, a
        route to a missing connector) leaves every running object as it was.
        """
        old = self.config
        self._pending_filters = None
        out: list[str] = []
        steps: list[Any] = []
        needs_restart: list[str] = []

        # send connectors are built objects with connections and resolvers: a restart changes them
        old_send = {s.name: s for s in old.send}
        new_send = {s.name: s for s in new.send}
        if old_send != new_send:
            needs_restart.append("send connectors")

        # filters first: the only part that runs third-party code
        new_filters = None
        if new.filters != old.filters:
            if self.filter_env is None:
                needs_restart.append("filters")
            else:
                from exmta.plugins import load_filters

                new_filters = load_filters(new.filters, self.filter_env, source=new.source)

        if self.scheduler is not None:  # routes and queue settings (IReconfigurable), prepared, not applied
            plan = self.scheduler.prepare_reconfigure(new, old)
            steps.append(lambda: _none(plan.apply()))
            out += plan.applied
            needs_restart += plan.needs_restart

        old_rc = {rc.name: rc for rc in old.receive}
        new_rc = {rc.name: rc for rc in new.receive}
        if set(old_rc) != set(new_rc):
            needs_restart.append("added or removed receive connectors")
        for name, rc in new_rc.items():
            factory = self.factories.get(name)
            before = old_rc.get(name)
            if factory is None or before is None:
                continue
            if rc.listen != before.listen:
                needs_restart.append(f"receive.{name}.listen")
            for key in RESTART_RECEIVE_KEYS[1:]:
                if getattr(rc, key, None) != getattr(before, key, None):
                    needs_restart.append(f"receive.{name}.{key}")
            if rc == before and new.accepted_domains == old.accepted_domains and new_filters is None:
                continue
            steps.append(self._prepare_receive(factory, new, rc, new_filters))
            out.append(f"receive.{name}: policy, filters and limits applied to sessions from their next command")

        for key in _RESTART_SERVER_KEYS:
            if getattr(new, key, None) != getattr(old, key, None):
                needs_restart.append(key)
        if new.metrics.listen != old.metrics.listen:
            needs_restart.append("metrics.listen")
        if new.metrics.allowed_networks != old.metrics.allowed_networks:
            needs_restart.append("metrics.allowed_networks")
        if self.observability is not None and (new.alerts != old.alerts or new.metrics != old.metrics):
            observability = self.observability
            steps.append(lambda: observability.reload(new))  # its messages come after the others
        tail: list[str] = []
        if needs_restart:
            tail.append("needs a restart to take effect (the old values stay in use): "
                        + ", ".join(dict.fromkeys(needs_restart)))
        if new_filters is not None:
            self._pending_filters = new_filters
        steps.append(lambda: tail)
        return steps, out

    def _prepare_receive(self, factory: Any, config: Any, rc: Any, new_filters: dict[str, Any] | None) -> Any:
        """Build the new policy and filter chain of one receive factory; -> the step that swaps them in."""
        from exmta.assembly import accepts_locally, build_chain, postmaster_domain

        policy = self._policy(config, rc, factory.policy)
        chain = None
        if new_filters is not None or rc.filters != factory.config.filters:
            filters = new_filters if new_filters is not None else self.filters
            chain = build_chain(config, rc, filters, factory.clock,
                                admission=getattr(factory.filters, "admission", None),  # checks in flight stay bounded
                                verdict_observer=getattr(factory.filters, "verdict_observer", None))
        # limits, banner, timeouts for new sessions; what needs a restart keeps its running value
        keep = {k: getattr(factory.config, k) for k in RESTART_RECEIVE_KEYS
                if hasattr(factory.config, k) and hasattr(rc, k)}
        new_config = dataclasses.replace(rc, **keep)
        local_domain = accepts_locally(config)
        domain = postmaster_domain(config, factory.postmaster_domain)

        def swap() -> list[str]:
            if chain is not None:
                factory.filters = chain
            factory.policy = policy
            factory.local_domain = local_domain
            factory.postmaster_domain = domain
            factory.config = new_config
            return []
        return swap

    def _swap_receive(self, factory: Any, config: Any, rc: Any, new_filters: dict[str, Any] | None) -> None:
        self._prepare_receive(factory, config, rc, new_filters)()

    def _policy(self, config: Any, rc: Any, old: Any) -> Any:
        from exmta.assembly import build_policy
        from exmta.receive.wiring import ReceiveResources

        resources = self.resources  # the same shared resources (rates of the cluster too) as at start
        if resources is None:
            resources = ReceiveResources(back_pressure=getattr(old, "back_pressure", None),
                                         recipients=getattr(old, "recipients", None))
        return build_policy(config, rc, self.reactor, resources)


def _none(_result: Any) -> None:
    return None


class ReloadService(Service):
    """Installs the SIGHUP handler while running (chaining the previous one)."""

    def __init__(self, reloader: ConfigReloader, reactor: Any, install_signal: bool = True) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self.install_signal = install_signal
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if not self.install_signal or not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_sighup)
            self._installed = True
            if self.reloader.config.source.startswith("<"):
                log.info("SIGHUP: the embedded default configuration has no file, so SIGHUP reloads nothing")
            else:
                log.info("SIGHUP reloads {source}", source=self.reloader.config.source)
        except ValueError:
            log.warn("SIGHUP handler for configuration reload not installed (not in the main thread)")

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reload)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def _reload(self) -> None:
        if self.reloader.config.source.startswith("<"):
            log.warn("SIGHUP: running the embedded default configuration, there is no file to reload")
            return
        log.info("SIGHUP: reloading {source}", source=self.reloader.config.source)
        self.reloader.reload()

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            try:
                signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
            self._installed = False
