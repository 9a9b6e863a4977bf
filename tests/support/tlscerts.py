"""Certificates made at test time by a private test CA (trustme), written as PEM files.

``pki = TestPKI(tmp_path)``; ``pki.server("mx.example.test")`` writes
``<name>.pem`` (certificate + chain) and ``<name>.key`` and returns a
:class:`CertFiles`; ``pki.ca_file`` is the CA to trust.  ``expired=True`` /
``future=True`` make certificates outside their validity period;
``other_ca()`` gives a second, untrusted CA.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    cert: Path   # certificate followed by its chain
    key: Path

    @property
    def combined(self) -> bytes:
        return self.cert.read_bytes() + self.key.read_bytes()


class TestPKI:
    """A trustme CA whose certificates go to files under ``directory``."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name=f"exmta test {name}")
        self.ca_file = self.directory / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.name = name

    def issue(self, *names: str, file: str | None = None, common_name: str | None = None,
              expired: bool = False, future: bool = False) -> CertFiles:
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before = not_after = None
        if expired:
            not_before, not_after = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
        elif future:
            not_before, not_after = now + datetime.timedelta(days=1), now + datetime.timedelta(days=30)
        leaf = self.ca.issue_cert(*names, common_name=common_name or names[0], not_before=not_before,
                                  not_after=not_after)
        stem = file or f"{self.name}-{names[0]}"
        cert = self.directory / f"{stem}.pem"
        key = self.directory / f"{stem}.key"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return CertFiles(cert, key)

    server = issue
    client = issue

    def other_ca(self, name: str = "other-ca") -> TestPKI:
        return TestPKI(self.directory, name)
