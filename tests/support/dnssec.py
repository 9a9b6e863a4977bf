"""A DNSSEC-signed zone served by Knot and validated by unbound, on loopback (COMPONENTS.md section 6).

:class:`SignedZone` signs the zone once with knotd (``dnssec-signing: on``,
``zonefile-sync: 0``), reads the DS with ``keymgr``, optionally tampers
with records of the signed copy (their RRSIGs stay: a bogus answer), and
serves that copy with signing off.  :class:`Unbound` validates it with the
DS as trust anchor (``local-zone: "test." nodefault``, stub to Knot).

    with SignedZone(tmp, "dane.test", records, tamper={"_25._tcp.mx.bogus": "3 1 1 00..."}) as z, \\
         Unbound(tmp, z) as u:
        u.nameservers  # [("127.0.0.1", port)]: the AD bit of this resolver is trusted
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from .procs import LOOPBACK, ManagedProcess, ProcessError, free_port, wait_until

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"
KEYMGR = shutil.which("keymgr") or "/usr/sbin/keymgr"
UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"

_KNOT = """\
server:
    rundir: "{d}/run"
    listen: {host}@{port}
database:
    storage: "{d}/db"
control:
    listen: "{d}/run/knot.sock"
log:
  - target: stdout
    any: info
policy:
  - id: fast
    algorithm: ecdsap256sha256
    single-type-signing: on
    nsec3: off
zone:
  - domain: {origin}
    storage: "{d}/{zones}"
    file: "%s.zone"
    zonefile-load: whole
{zone_opts}
"""
_NO_CACHE = "    cache-max-ttl: 0\n    cache-max-negative-ttl: 0\n"
_SIGN = "    dnssec-signing: on\n    dnssec-policy: fast\n    zonefile-sync: 0\n"
_SERVE = "    dnssec-signing: off\n    zonefile-sync: -1\n    journal-content: none\n"

_UNBOUND = """\
server:
    interface: {host}@{port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    val-log-level: 2
    local-zone: "test." nodefault
    do-not-query-localhost: no
    outgoing-interface: 127.0.0.1
    do-ip6: no
{cache}    trust-anchor: "{ds}"
remote-control:
    control-enable: no
stub-zone:
    name: "{origin}"
    stub-addr: {host}@{knot_port}
"""


def available() -> bool:
    return all(Path(p).exists() for p in (KNOTD, KEYMGR, UNBOUND))


def _dns_up(host: str, port: int, name: str) -> bool:
    try:
        r = dns.query.tcp(dns.message.make_query(name, "SOA"), host, port=port, timeout=0.5)
    except (OSError, dns.exception.DNSException):
        return False
    return r.rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)


class SignedZone:
    """Sign ``records`` for ``origin`` with knotd, tamper, serve; see the module docstring."""

    def __init__(self, directory: Path, origin: str, records: str, tamper: dict[str, str] | None = None) -> None:
        self.dir = Path(directory).resolve() / "dnssec"
        self.origin = origin.rstrip(".")
        self.records = records
        self.tamper = tamper or {}
        self.host = LOOPBACK
        self.port = free_port()
        self.ds = ""
        self.process: ManagedProcess | None = None

    def _conf(self, name: str, zones: str, opts: str) -> Path:
        for sub in ("run", "db", zones):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.dir / f"knot-{name}.conf"
        conf.write_text(_KNOT.format(d=self.dir, host=self.host, port=self.port, origin=self.origin, zones=zones,
                                     zone_opts=opts))
        return conf

    def sign(self) -> None:
        soa = "@ 300 IN SOA ns1 hostmaster 1 3600 900 604800 60\n@ 300 IN NS ns1\nns1 300 IN A 127.0.0.1\n"
        zones = self.dir / "zones"
        zones.mkdir(parents=True, exist_ok=True)
        zone_file = zones / f"{self.origin}.zone"
        zone_file.write_text(f"$ORIGIN {self.origin}.\n$TTL 300\n{soa}{self.records}\n")
        conf = self._conf("sign", "zones", _SIGN)
        knotd = ManagedProcess([KNOTD, "-c", str(conf)], log_path=self.dir / "knot-sign.log", name="knotd-sign",
                               stop_timeout=5.0).start()
        try:
            wait_until(lambda: "RRSIG" in zone_file.read_text() and "DNSKEY" in zone_file.read_text(), 20.0,
                       "knotd signing the zone", proc=knotd.proc)
            out = subprocess.run([KEYMGR, "-c", str(conf), self.origin, "ds"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout
        finally:
            knotd.stop()
        ds = [ln for ln in out.splitlines() if re.search(r"\bDS\s+\d+\s+13\s+2\s", ln)]
        if not ds:
            raise ProcessError(f"keymgr printed no SHA-256 DS: {out!r}")
        self.ds = ds[0].strip()
        text = zone_file.read_text()
        for owner, rdata in self.tamper.items():
            fqdn = re.escape(f"{owner}.{self.origin}.")
            text, n = re.subn(rf"^({fqdn}\s+\d+\s+TLSA\s+)(.+)$", rf"\g<1>{rdata}", text, count=1, flags=re.M)
            if n != 1:
                raise ProcessError(f"no TLSA record of {owner} to tamper with in the signed zone")
        served = self.dir / "served"
        served.mkdir(exist_ok=True)
        (served / f"{self.origin}.zone").write_text(text)

    def start(self, timeout: float = 20.0) -> SignedZone:
        self.sign()
        conf = self._conf("serve", "served", _SERVE)
        self.process = ManagedProcess([KNOTD, "-c", str(conf)], log_path=self.dir / "knot-serve.log",
                                      name="knotd-serve", stop_timeout=5.0).start()
        wait_until(lambda: _dns_up(self.host, self.port, self.origin + "."), timeout, "knotd serving the signed zone",
                   proc=self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> SignedZone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Unbound:
    """A validating unbound on 127.0.0.1:<free port> that trusts only ``zone``'s DS."""

    def __init__(self, directory: Path, zone: SignedZone, cache: bool = False) -> None:
        self.cache = cache  # False: every answer fresh from Knot (tests); True: caching, as in production
        self.dir = Path(directory).resolve() / "unbound"
        self.zone = zone
        self.host = LOOPBACK
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [(self.host, self.port)]

    def start(self, timeout: float = 20.0) -> Unbound:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "unbound.conf"
        conf.write_text(_UNBOUND.format(host=self.host, port=self.port, d=self.dir, ds=self.zone.ds,
                                        origin=self.zone.origin, knot_port=self.zone.port,
                                        cache="" if self.cache else _NO_CACHE))
        self.process = ManagedProcess([UNBOUND, "-d", "-c", str(conf)], log_path=self.dir / "unbound.log",
                                      name="unbound", stop_timeout=5.0).start()
        wait_until(lambda: _dns_up(self.host, self.port, self.zone.origin + "."), timeout, "unbound",
                   proc=self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Unbound:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

