"""npm ``oidc-provider`` as a loopback OAuth2 token endpoint (client credentials), stopped by PID.

``scripts/deps-oauth2.sh`` installs it into ``tests/support/oidc/node_modules``.
Clients are given per instance (a secret client, a ``private_key_jwt`` client
with a JWKS made from a test certificate, Dovecot's introspection client);
``restart(clients)`` swaps them, which also forgets every token issued so far
(the in-memory adapter), as a revocation does.  ``issued()`` lists the tokens
handed out, so that tests can look for them where they must not be.
"""
from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from .procs import LOOPBACK, ManagedProcess, free_port, wait_until

HERE = Path(__file__).resolve().parent / "oidc"
NODE = shutil.which("node") or "/usr/bin/node"
SCOPE = "https://outlook.office365.com/.default"


def available() -> bool:
    return Path(NODE).exists() and (HERE / "node_modules" / "oidc-provider" / "package.json").exists()


def secret_client(client_id: str, secret: str) -> dict[str, Any]:
    return {"client_id": client_id, "client_secret": secret, "grant_types": ["client_credentials"],
            "response_types": [], "redirect_uris": [], "token_endpoint_auth_method": "client_secret_post"}


def certificate_client(client_id: str, cert_pem: bytes) -> dict[str, Any]:
    """A private_key_jwt client whose JWKS is the certificate's RSA key (as an Entra app's certificate)."""
    from cryptography import x509

    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    numbers = key.public_numbers()  # type: ignore[union-attr]

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    jwk = {"kty": "RSA", "n": b64(numbers.n), "e": b64(numbers.e), "alg": "RS256", "use": "sig"}
    return {"client_id": client_id, "grant_types": ["client_credentials"], "response_types": [],
            "redirect_uris": [], "token_endpoint_auth_method": "private_key_jwt",
            "token_endpoint_auth_signing_alg": "RS256", "jwks": {"keys": [jwk]}}


def introspection_client(client_id: str = "dovecot", secret: str = "dovecot-secret") -> dict[str, Any]:
    return {"client_id": client_id, "client_secret": secret, "grant_types": [], "response_types": [],
            "redirect_uris": [], "token_endpoint_auth_method": "client_secret_basic"}


class OIDCProvider:
    """One ``node server.mjs`` on 127.0.0.1: ``start()`` ... ``stop()``."""

    def __init__(self, root: str | Path, clients: list[dict[str, Any]], ttl: int = 3600,
                 email: str = "relay@example.test", port: int | None = None) -> None:
        self.root = Path(root)
        self.clients = clients
        self.ttl = ttl
        self.email = email
        self.port = port or free_port()
        self.token_log = self.root / "tokens.log"
        self.process: ManagedProcess | None = None

    @property
    def issuer(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/token/introspection"

    def start(self, timeout: float = 30.0) -> "OIDCProvider":
        self.root.mkdir(parents=True, exist_ok=True)
        clients = self.root / "clients.json"
        clients.write_text(json.dumps(self.clients))
        env = {"PATH": "/usr/bin:/bin", "PORT": str(self.port), "CLIENTS_JSON": str(clients),
               "TOKEN_TTL": str(self.ttl), "TOKEN_EMAIL": self.email, "TOKEN_LOG": str(self.token_log)}
        self.process = ManagedProcess([NODE, HERE / "server.mjs"], log_path=self.root / "oidc.log", env=env,
                                      cwd=HERE, name=f"oidc:{self.port}").start()

        def discovery() -> bool:
            with urllib.request.urlopen(f"{self.issuer}/.well-known/openid-configuration", timeout=5) as r:
                return json.load(r)["issuer"] == self.issuer

        wait_until(discovery, timeout, f"oidc-provider on {self.port}", interval=0.05, proc=self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self, clients: list[dict[str, Any]] | None = None) -> None:
        """Stop, change the clients, start on the same port; every token issued before is forgotten."""
        self.stop()
        if clients is not None:
            self.clients = clients
        self.start()

    def issued(self) -> list[str]:
        """Tokens handed out so far (all runs)."""
        if not self.token_log.exists():
            return []
        lines = self.token_log.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("!")]

    def grant_errors(self) -> list[str]:
        if not self.token_log.exists():
            return []
        return [line[2:] for line in self.token_log.read_text().splitlines() if line.startswith("! ")]

    def log_text(self) -> str:
        return self.process.log_text() if self.process is not None else (self.root / "oidc.log").read_text()

    def __enter__(self) -> "OIDCProvider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
