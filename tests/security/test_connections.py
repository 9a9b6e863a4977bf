"""Issue 11 item 9: connections cannot exhaust file descriptors.

Before: on ``haproxy:`` listeners a connection that never sent the PROXY header
had no timeout and was not counted (30 from one address stayed open with a
per-IP limit of 5); any peer could send a PROXY header and claim a relay
address; the open files limit was never raised; per-IP limits counted each
IPv6 address of a /64 separately.
"""
from __future__ import annotations

import resource
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from exmta.receive.fdlimit import session_budget
from exmta.receive.ranges import ConnectionCounter
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml


def _haproxy(toml: str) -> str:
    """A second listen endpoint of the connector, behind the PROXY protocol, on ``{pport}``."""
    return toml.replace('listen = ["tcp:{port}:interface=127.0.0.1"]',
                        'listen = ["tcp:{port}:interface=127.0.0.1", "haproxy:tcp:{pport}:interface=127.0.0.1"]')


def _closed_by_server(s: socket.socket, timeout: float = 30.0) -> bool:
    """True when the server closes ``s`` (EOF or reset) within ``timeout`` seconds without a byte."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.integration
def test_connections_without_a_proxy_header_are_counted_and_timed_out(exmta_factory) -> None:
    pport = procs.free_port()
    ex: ExmtaProcess = exmta_factory(toml=_haproxy(exmta_toml(receive_extra=(
        'max_connections_per_ip = 5\nproxy_header_timeout = "1s"\n'))), subst={"pport": pport})
    conns = [socket.create_connection((procs.LOOPBACK, pport), timeout=30) for _ in range(30)]
    try:
        closed = [_closed_by_server(s) for s in conns]
    finally:
        for s in conns:
            s.close()
    assert closed == [True] * 30
    log = ex.log_text()
    assert "no PROXY header within 1" in log and "too many connections from 127.0.0.1" in log


@pytest.mark.integration
def test_only_trusted_proxies_may_claim_a_client_address(exmta_factory) -> None:
    pport = procs.free_port()
    ex: ExmtaProcess = exmta_factory(toml=_haproxy(exmta_toml(relay_networks=("10.0.0.0/8",), receive_extra=(
        'trusted_proxies = ["192.0.2.0/24"]\n'))), subst={"pport": pport})
    with socket.create_connection((procs.LOOPBACK, pport), timeout=30) as s:
        s.sendall(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\nEHLO c.example\r\n")
        assert _closed_by_server(s)
    assert "not a trusted proxy" in ex.log_text()


def test_per_ip_limits_group_ipv6_by_64() -> None:
    counter = ConnectionCounter(max_per_ip=2)
    counter.opened("2001:db8::1")
    counter.opened("2001:db8::ffff:2")
    assert counter.refusal("2001:db8::3") is not None          # the same /64
    assert counter.refusal("2001:db8:0:1::1") is None          # the next /64
    assert counter.refusal("192.0.2.1") is None
    counter.closed("2001:db8::1")
    assert counter.refusal("2001:db8::3") is None


@dataclass
class _RC:
    max_connections: int


def test_sessions_are_capped_below_the_open_files_limit() -> None:
    assert session_budget([_RC(5000)], 1024) == 768            # the default would have hit EMFILE
    assert session_budget([_RC(5000), _RC(0)], 1024) == 768    # 0 = no limit: capped too
    assert session_budget([_RC(500)], 1024) == 0               # fits: no cap


def test_the_open_files_limit_is_raised_at_start() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.fail(f"the hard open files limit {hard} is too low for this test")
    code = ("import resource; from exmta.receive.fdlimit import raise_nofile; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], raise_nofile()[0])")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=low_soft_limit, check=True).stdout.split()
    assert int(out[0]) == 256 and int(out[1]) > 256
