"""pytest fixtures for integration tests (load with ``pytest_plugins = ["support.fixtures"]``).

Every fixture starts its server on a free 127.0.0.1 port under the test's
``tmp_path`` and stops it by PID at teardown.

=====================  ==========================================================
fixture                yields
=====================  ==========================================================
``free_tcp_port``      an int: a TCP port on 127.0.0.1 that was free just now
``smtp_sink``          a started :class:`support.sinks.SmtpSink` (aiosmtpd,
                       records ``messages``; ``wait_for(n)``; ``next_hop``)
``smtp_sink_factory``  ``make(**kw) -> SmtpSink`` (started; e.g. ``rcpt_policy=``)
``postfix_factory``    ``make(**kw) -> PostfixInstance`` (started; kwargs of
                       :class:`support.postfix.PostfixInstance` except ``root``)
``postfix_relay``      a Postfix relaying everything from 127.0.0.0/8 to ``smtp_sink``
``postfix_maildir``    a Postfix delivering ``example.net`` to Maildirs
                       (``maildir_messages(addr)``, ``wait_maildir(addr, n)``)
``dovecot_lmtp``       a started :class:`support.dovecot.DovecotLmtp` (LMTP on
                       ``.port``, users alice/bob@example.net, ``wait_maildir``)
``exmta_factory``      ``make(toml=... | data_dir=..., port=...) -> ExmtaProcess``
                       (``twistd -n exmta``, waited for its 220, stopped by SIGTERM;
                       ``support.exmta_proc.exmta_toml()`` builds a config)
``exmta_relay``        exmta on a free port: example.test to Maildir under its
                       data dir, everything else relayed to ``smtp_sink``
``log_events``         the list of every twisted.logger event emitted during the test
``keys``               :class:`support.authzones.Keys` (module scope)
``knot_server``        Knot serving ``authzones.zones(keys)`` (module scope; a module
                       that needs other zones defines its own ``knot_server``)
=====================  ==========================================================

Fixtures skip (with the reason) only when the external program is not
installed; run ``scripts/install-test-deps.sh`` to get them all.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import authzones, knot
from . import dovecot as dovecot_mod
from . import exmta_proc
from . import postfix as postfix_mod
from .procs import free_port
from .sinks import SmtpSink


def _need(program: str, available: bool) -> None:
    if not available:
        # a missing real peer is a failure, never a silent skip: CI installs every one of them
        pytest.fail(f"{program} is not installed (run scripts/install-test-deps.sh)")


@pytest.fixture
def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_port()


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """Factory for started aiosmtpd sinks; all stopped at teardown."""
    sinks: list[SmtpSink] = []

    def make(**kw: Any) -> SmtpSink:
        sink = SmtpSink(**kw).start()
        sinks.append(sink)
        return sink
    yield make
    for sink in reversed(sinks):
        sink.stop()


@pytest.fixture
def smtp_sink(smtp_sink_factory: Callable[..., SmtpSink]) -> SmtpSink:
    """A started aiosmtpd sink on a free port that records every message."""
    return smtp_sink_factory()


@pytest.fixture
def postfix_factory(tmp_path: Path) -> Iterator[Callable[..., postfix_mod.PostfixInstance]]:
    """Factory for started private Postfix instances under tmp_path."""
    _need("postfix", postfix_mod.available())
    instances: list[postfix_mod.PostfixInstance] = []

    def make(**kw: Any) -> postfix_mod.PostfixInstance:
        root = tmp_path / f"postfix{len(instances)}"
        pf = postfix_mod.PostfixInstance(root, **kw)
        instances.append(pf)
        return pf.start()
    yield make
    for pf in reversed(instances):
        pf.stop()


@pytest.fixture
def postfix_relay(
    smtp_sink: SmtpSink, postfix_factory: Callable[..., postfix_mod.PostfixInstance],
) -> postfix_mod.PostfixInstance:
    """A private Postfix relaying everything from 127.0.0.0/8 to ``smtp_sink``."""
    # (the sink is set up first so that it is torn down last)
    return postfix_factory(relayhost=smtp_sink.next_hop)


@pytest.fixture
def postfix_maildir(
    postfix_factory: Callable[..., postfix_mod.PostfixInstance],
) -> postfix_mod.PostfixInstance:
    """A private Postfix delivering example.net to Maildirs (alice, bob own ones)."""
    return postfix_factory(
        maildir_domains=["example.net"],
        maildir_users=["alice@example.net", "bob@example.net"],
    )


@pytest.fixture
def dovecot_lmtp(tmp_path: Path) -> Iterator[dovecot_mod.DovecotLmtp]:
    """A private Dovecot with LMTP on a free port, Maildirs under tmp_path."""
    _need("dovecot (dovecot-core, dovecot-lmtpd)", dovecot_mod.available())
    dv = dovecot_mod.DovecotLmtp(tmp_path / "dovecot",
                                 users=["alice@example.net", "bob@example.net"])
    dv.start()
    yield dv
    dv.stop()


@pytest.fixture
def exmta_factory(tmp_path: Path) -> Iterator[Callable[..., exmta_proc.ExmtaProcess]]:
    """Factory: ``make(toml=TEXT | data_dir=DIR, port=PORT)`` starts ``twistd -n exmta``."""
    _need("exmta's twistd plugin (exmta/tap.py)", importlib.util.find_spec("exmta.tap") is not None)
    procs: list[exmta_proc.ExmtaProcess] = []

    def make(**kw: Any) -> exmta_proc.ExmtaProcess:
        kw.setdefault("workdir", tmp_path / f"exmta{len(procs)}")
        p = exmta_proc.ExmtaProcess(**kw)
        procs.append(p)
        return p.start()
    yield make
    for p in reversed(procs):
        p.stop()


@pytest.fixture
def exmta_relay(
    smtp_sink: SmtpSink, exmta_factory: Callable[..., exmta_proc.ExmtaProcess],
) -> exmta_proc.ExmtaProcess:
    """exmta: example.test delivered to Maildir, the rest relayed to ``smtp_sink``."""
    # (the sink is set up first so that it is torn down last)
    return exmta_factory(toml=exmta_proc.exmta_toml(smarthost=smtp_sink.next_hop))


@pytest.fixture(scope="module")
def keys() -> authzones.Keys:
    """The DKIM keys published in the auth test zones, one set per test module."""
    return authzones.make_keys()


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory, keys: authzones.Keys) -> Iterator[knot.KnotServer]:
    """Knot on loopback serving the SPF/DKIM/DMARC/ARC test zones of support.authzones."""
    with knot.KnotServer(tmp_path_factory.mktemp("authdns"), authzones.zones(keys)) as server:
        yield server


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every event sent to the global log publisher while the test runs."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
