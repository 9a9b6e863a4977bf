"""A throwaway OpenLDAP ``slapd`` on 127.0.0.1 with StartTLS and LDAPS, shaped like Active Directory.

The directory ``dc=example,dc=test`` holds people with AD's
``sAMAccountName``, ``userPrincipalName`` and ``proxyAddresses`` (defined in
a small schema of our own: Debian's msuser.schema gives proxyAddresses no
EQUALITY rule, see COMPONENTS.md section 9) and a lookup account. The
server certificate comes from a trustme CA made for the test; ``ca_file``
is that CA. Anonymous clients may not search (as in AD), so lookups need
the service account.

    with SlapdServer(tmp_path, PEOPLE) as ldap:
        ldap.uri, ldap.ldaps_uri, ldap.ca_file, ldap.bind_dn, ldap.bind_password
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

from .procs import LOOPBACK, ManagedProcess, ProcessError, free_ports

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SLAPPASSWD = shutil.which("slappasswd") or "/usr/sbin/slappasswd"

BASE_DN = "dc=example,dc=test"
BIND_DN = f"cn=svc-exmta,{BASE_DN}"
BIND_PASSWORD = "lookup-secret"

SCHEMA = """\
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
    DESC 'AD proxyAddresses: SMTP:primary, smtp:secondary, X500:...'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
    DESC 'AD logon name (pre-Windows 2000)'
    EQUALITY caseIgnoreMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
    DESC 'AD user principal name'
    EQUALITY caseIgnoreMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
"""

CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {d}/exmta-ad.schema
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
TLSCertificateFile {d}/server.pem
TLSCertificateKeyFile {d}/server.key
TLSCACertificateFile {d}/ca.pem
TLSProtocolMin 3.3
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{base}"
rootdn "cn=admin,{base}"
rootpw admin-secret
directory {d}/db
index objectClass eq
index mail,proxyAddresses,sAMAccountName,userPrincipalName eq
access to attrs=userPassword by anonymous auth by self write by * none
access to * by users read by * none
"""

#: (cn, password, attributes) of the people in the directory
PEOPLE: list[tuple[str, str, dict[str, list[str]]]] = [
    ("alice", "alice-secret", {
        "sAMAccountName": ["alice"],
        "userPrincipalName": ["alice@corp.example.test"],
        "mail": ["alice@example.test"],
        "proxyAddresses": ["SMTP:alice@example.test", "smtp:a.example@example.test",
                           "smtp:alice@legacy.example.test", "X500:/o=Example/ou=Exchange/cn=alice",
                           "sip:alice@example.test"],
    }),
    ("bob", "bob-secret", {
        "sAMAccountName": ["bob"],
        "mail": ["bob@example.test"],
    }),
    # entries sharing a mail value: a login by that value is ambiguous and must fail
    ("twin1", "twin-secret", {"sAMAccountName": ["twin1"], "mail": ["twins@example.test"]}),
    ("twin2", "twin-secret", {"sAMAccountName": ["twin2"], "mail": ["twins@example.test"]}),
    ("triplet1", "t-secret", {"sAMAccountName": ["triplet1"], "mail": ["triplets@example.test"]}),
    ("triplet2", "t-secret", {"sAMAccountName": ["triplet2"], "mail": ["triplets@example.test"]}),
    ("triplet3", "t-secret", {"sAMAccountName": ["triplet3"], "mail": ["triplets@example.test"]}),
]


def available() -> bool:
    return Path(SLAPD).exists() and Path(SLAPADD).exists()


def _hash(password: str) -> str:
    return subprocess.run([SLAPPASSWD, "-s", password], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


class SlapdServer:
    """slapd with the ``people`` on two free loopback ports: ldap:// (StartTLS) and ldaps://."""

    def __init__(self, directory: Path, people: list[tuple[str, str, dict[str, list[str]]]] | None = None) -> None:
        self.dir = Path(directory).resolve() / "slapd"
        self.people = PEOPLE if people is None else people
        self.host = LOOPBACK
        self.port, self.ldaps_port = free_ports(2, LOOPBACK)
        self.process: ManagedProcess | None = None
        self.base_dn = BASE_DN
        self.bind_dn = BIND_DN
        self.bind_password = BIND_PASSWORD

    @property
    def uri(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://{self.host}:{self.ldaps_port}"

    @property
    def ca_file(self) -> str:
        return str(self.dir / "ca.pem")

    def dn(self, cn: str) -> str:
        return f"cn={cn},ou=people,{BASE_DN}"

    def _ldif(self) -> str:
        out = [
            f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n",
            f"dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {BIND_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\ncn: svc-exmta\n"
            f"sn: service\nuserPassword: {_hash(BIND_PASSWORD)}\n",
        ]
        for cn, password, attributes in self.people:
            lines = [f"dn: {self.dn(cn)}", "objectClass: inetOrgPerson", "objectClass: extensibleObject",
                     f"cn: {cn}", f"sn: {cn}", f"userPassword: {_hash(password)}"]
            for name, values in attributes.items():
                lines += [f"{name}: {v}" for v in values]
            out.append("\n".join(lines) + "\n")
        return "\n".join(out)

    def write_config(self) -> Path:
        import trustme

        (self.dir / "db").mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert(self.host, "localhost")
        cert.private_key_pem.write_to_path(str(self.dir / "server.key"))
        (self.dir / "server.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        ca.cert_pem.write_to_path(self.ca_file)
        (self.dir / "exmta-ad.schema").write_text(SCHEMA)
        conf = self.dir / "slapd.conf"
        conf.write_text(CONF.format(d=self.dir, base=BASE_DN))
        (self.dir / "data.ldif").write_text(self._ldif())
        result = subprocess.run([SLAPADD, "-f", str(conf), "-l", str(self.dir / "data.ldif")],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ProcessError(f"slapadd failed: {result.stderr}")
        return conf

    def start(self, timeout: float = 15.0) -> SlapdServer:
        conf = self.write_config()
        ldapi = "ldapi://" + urllib.parse.quote(str(self.dir / "ldapi"), safe="")
        urls = f"ldap://{self.host}:{self.port}/ ldaps://{self.host}:{self.ldaps_port}/ {ldapi}"
        self.process = ManagedProcess([SLAPD, "-d", "0", "-f", str(conf), "-h", urls],
                                      log_path=self.dir / "slapd.log", name="slapd", stop_timeout=5.0).start()
        deadline = time.monotonic() + timeout
        while True:
            if not self.process.running():
                raise ProcessError(f"slapd exited early:\n{self.process.log_tail()}")
            try:
                for port in (self.port, self.ldaps_port):
                    socket.create_connection((self.host, port), timeout=0.5).close()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessError(f"slapd not listening on {self.port}:\n{self.process.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> SlapdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
