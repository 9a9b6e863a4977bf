"""What went wrong in a TLS handshake, as one line of text for logs and SMTP replies.

:func:`record_verify_error` remembers the first certificate problem of a connection (the
verify callbacks of :mod:`exmta.tls.context` and :mod:`exmta.tls.client` call it, so a bad
chain does not break the handshake), :func:`verify_errors` gives it back, and
:func:`describe_tls_failure` turns a failed handshake into a reason. Both the server side
(:mod:`exmta.tls.context`, :mod:`exmta.tls.verify`) and the client side use it.
"""
from __future__ import annotations

import weakref
from typing import Any

from OpenSSL import SSL, crypto
from twisted.python.failure import Failure

__all__ = ["describe_tls_failure", "record_verify_error", "verify_errors"]

#: first certificate verification problem per connection, as text; see verify_errors()
_VERIFY_ERRORS: weakref.WeakKeyDictionary[SSL.Connection, str] = weakref.WeakKeyDictionary()

# X509_V_ERR_* codes worth a word (the rest are shown by number)
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


def verify_errors(connection: Any) -> str | None:
    """The first certificate verification problem recorded for ``connection``, or None."""
    try:
        return _VERIFY_ERRORS.get(connection)
    except TypeError:  # not weak-referenceable: not an OpenSSL connection
        return None


def record_verify_error(conn: SSL.Connection, cert: crypto.X509 | None, errno: int, depth: int,
                        text: str | None = None) -> None:
    """Remember why verification of ``conn`` failed (first problem only)."""
    try:
        if conn in _VERIFY_ERRORS:
            return
        try:
            subject = cert.to_cryptography().subject.rfc4514_string() if cert is not None else "?"
        except Exception:
            subject = "?"
        what = text or _X509_ERRORS.get(errno, f"verification error {errno}")
        _VERIFY_ERRORS[conn] = f"{what} (depth {depth}, {subject})"
    except TypeError:
        pass



def describe_tls_failure(reason: Failure | BaseException | None, connection: Any = None) -> str | None:
    """A one-line reason for a TLS failure (handshake alert, verification), or None if not TLS.

    ``connection`` (the OpenSSL connection) adds the recorded certificate problem, if any.
    """
    exc = reason.value if isinstance(reason, Failure) else reason
    if exc is None:
        return None
    if isinstance(exc, SSL.Error):
        parts = []
        for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
            if isinstance(item, tuple) and len(item) == 3:
                parts.append(str(item[2]))
        done = False
        try:
            done = connection is not None and connection.get_finished() is not None
        except Exception:  # not an OpenSSL connection
            done = False
        what = "TLS error after the handshake" if done else "TLS handshake failed"
        text = f"{what}: " + (", ".join(parts) or str(exc) or exc.__class__.__name__)
        detail = verify_errors(connection) if connection is not None else None
        return f"{text}: {detail}" if detail else text
    name = exc.__class__.__name__
    if name == "VerificationError" or exc.__class__.__module__.startswith("service_identity"):
        return f"TLS certificate name verification failed: {exc}"
    return None
