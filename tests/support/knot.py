"""A private Knot DNS authoritative server on 127.0.0.1:<free port> for DNS tests.

The config and zone files go under a per-test directory (Knot wants
absolute paths); ``knotd -c conf`` runs in the foreground and is stopped by
its PID.  Readiness is probed with an SOA query over TCP (a UDP probe to a
port not yet bound would wait the whole timeout, see COMPONENTS.md).

    with KnotServer(tmp_path, {"example.test": RECORDS}) as knot:
        resolver = DNSResolver(reactor, pool, knot.nameservers)
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from .procs import LOOPBACK, ManagedProcess, ProcessError, free_port

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"

CONF = """\
server:
    rundir: "{d}/run"
    listen: [ {host}@{port} ]
database:
    storage: "{d}/db"
control:
    listen: "{d}/run/knot.sock"
log:
  - target: stdout
    any: info
template:
  - id: default
    storage: "{d}/zones"
    file: "%s.zone"
    zonefile-load: whole
    journal-content: none
zone:
{zones}
"""

SOA = "@ 3600 IN SOA ns1 hostmaster 1 3600 900 604800 60\n@ 3600 IN NS ns1\nns1 3600 IN A 127.0.0.1\n"


def available() -> bool:
    return Path(KNOTD).exists()


class KnotServer:
    """Serve ``zones`` (origin -> records, without SOA/NS, which are added) on loopback."""

    def __init__(self, directory: Path, zones: dict[str, str], port: int | None = None) -> None:
        self.dir = Path(directory).resolve() / "knot"
        self.zones = zones
        self.host = LOOPBACK
        self.port = port or free_port(LOOPBACK)
        self.process: ManagedProcess | None = None

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    def write_config(self) -> Path:
        for sub in ("run", "db", "zones"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for origin, records in self.zones.items():
            origin = origin.rstrip(".")
            text = f"$ORIGIN {origin}.\n$TTL 60\n{SOA}{records}\n"
            (self.dir / "zones" / f"{origin}.zone").write_text(text)
        zone_list = "".join(f"  - domain: {o.rstrip('.')}\n" for o in self.zones)
        conf = self.dir / "knot.conf"
        conf.write_text(CONF.format(d=self.dir, host=self.host, port=self.port, zones=zone_list))
        return conf

    def start(self, timeout: float = 10.0) -> KnotServer:
        conf = self.write_config()
        self.process = ManagedProcess([KNOTD, "-c", str(conf)], log_path=self.dir / "knotd.log",
                                      name="knotd", stop_timeout=5.0).start()
        first = next(iter(self.zones)).rstrip(".")
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.running():
                raise ProcessError(f"knotd exited early:\n{self.process.log_tail()}")
            try:
                q = dns.message.make_query(first + ".", "SOA")
                r = dns.query.tcp(q, self.host, port=self.port, timeout=0.5)
                if r.rcode() == dns.rcode.NOERROR and r.answer:
                    return self
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"knotd not answering on {self.port}:\n{self.process.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> KnotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
