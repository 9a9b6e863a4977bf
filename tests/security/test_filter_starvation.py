"""Issue 11 item 2: filters blocked on a DNS server that never answers must not stall other connectors.

The review ran 60 sessions of ``MAIL FROM:<x@slow.test>`` into a connector with
the ``spf`` filter and a DNS server that never answered: end of data on another
connector with no filters then took 31-35 s, because the filters and the spool
shared one 8-thread pool with an unbounded queue. Here the same flood runs
against ``twistd -n exmta``; the other connector's message must be queued
while the SPF checks are still hanging, and the flood beyond the per-client
bound gets ``451 4.3.2`` at once.
"""
from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml

pytestmark = pytest.mark.integration

SESSIONS = 60
PER_CLIENT = 10


class StallingDNS:
    """A UDP "DNS server" on loopback that answers nothing until :meth:`release` (then SERVFAIL to all)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((procs.LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._held: list[tuple[bytes, tuple[str, int]]] = []
        self._released = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _servfail(query: bytes) -> bytes:
        end = 12
        while end < len(query) and query[end]:
            end += query[end] + 1
        end += 5  # the root label, QTYPE, QCLASS
        return query[:2] + b"\x81\x82\x00\x01\x00\x00\x00\x00\x00\x00" + query[12:end]

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                data, addr = self.sock.recvfrom(4096)
                self.queries += 1
                self._held.append((data, addr))
            if self._released.is_set():
                for data, addr in self._held:
                    self.sock.sendto(self._servfail(data), addr)
                self._held.clear()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def stalling_dns() -> Iterator[StallingDNS]:
    dns = StallingDNS()
    yield dns
    dns.close()


def _reply(s: socket.socket, timeout: float = 30) -> tuple[int, list[str]]:
    return procs.read_smtp_reply(s, timeout=timeout)


def test_hanging_spf_checks_do_not_stall_another_connectors_commit(exmta_factory, stalling_dns) -> None:
    internal_port = procs.free_port()
    ex: ExmtaProcess = exmta_factory(toml=exmta_toml(
        relay_networks=(),
        receive_extra='filters = ["spf"]\nmax_connections_per_ip = 100',
        extra=(f"[filters.spf]\nplugin = \"spf\"\ndns_servers = [\"127.0.0.1:{stalling_dns.port}\"]\n"
               "dns_timeout = 20.0\ncheck_helo = false\ntimeout = 50.0\n\n"
               "[receive.internal]\nlisten = [\"tcp:{internal_port}:interface=127.0.0.1\"]\n"),
    ).replace("[accepted_domains]", f"filter_checks_per_client = {PER_CLIENT}\n\n[accepted_domains]"),
        subst={"internal_port": internal_port})
    flood: list[socket.socket] = []
    try:
        for _ in range(SESSIONS):
            s = socket.create_connection((procs.LOOPBACK, ex.port), timeout=30)
            flood.append(s)
            assert _reply(s)[0] == 220
            s.sendall(b"EHLO flood.example\r\n")
            assert _reply(s)[0] == 250
        for s in flood:
            s.sendall(b"MAIL FROM:<x@slow.test>\r\n")
        # past the per-client bound, the MAIL commands are answered at once with 451 4.3.2
        busy: list[socket.socket] = []
        pending = list(flood)
        deadline_polls = 0
        while len(busy) < SESSIONS - PER_CLIENT and deadline_polls < 300:
            deadline_polls += 1
            ready, _, _ = select.select(pending, [], [], 0.1)
            for s in ready:
                code, text = _reply(s)
                assert (code, text[0].split()[0]) == (451, "4.3.2"), (code, text)
                busy.append(s)
                pending.remove(s)
        assert len(busy) == SESSIONS - PER_CLIENT
        procs.wait_until(lambda: stalling_dns.queries >= 1, 30, "the SPF checks asking DNS")

        # meanwhile the other connector (no filters) queues a message
        with socket.create_connection((procs.LOOPBACK, internal_port), timeout=30) as s:
            assert _reply(s)[0] == 220
            s.sendall(b"EHLO internal.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.test>\r\n"
                      b"DATA\r\n")
            assert [_reply(s)[0] for _ in range(4)] == [250, 250, 250, 354]
            s.sendall(b"Subject: not stalled\r\n\r\nbody\r\n.\r\n")
            assert _reply(s)[0] == 250
        # ... while the admitted SPF checks still hang on DNS
        ready, _, _ = select.select(pending, [], [], 0)
        assert ready == [] and len(pending) == PER_CLIENT
    finally:
        stalling_dns.release()
        for s in flood:
            s.close()
