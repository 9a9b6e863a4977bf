"""DKIM verification (RFC 6376; RSA and Ed25519, RFC 8463) of every signature, as a filter.

dkimpy does the cryptography; this module checks each DKIM-Signature field
separately and classifies the outcome per RFC 8601 2.7.1:

* ``pass``; ``fail`` (body hash or signature mismatch);
* ``permerror`` (malformed signature, no key / revoked key, key not base64,
  RSA key shorter than ``min_key_bits``, unknown algorithm, oversize TXT);
* ``temperror`` (the key lookup timed out or got SERVFAIL).

A message whose only verdict-relevant signatures failed temporarily is
answered 451 4.7.5 by default (``on_temperror = "tempfail"``); other
outcomes are recorded for DMARC and Authentication-Results only.

Config (``plugin = "dkim"``): ``dns_servers``, ``dns_timeout``,
``min_key_bits`` (1024), ``max_signatures`` (10), ``on_temperror``,
``skip_authenticated``.
"""
from __future__ import annotations

import binascii
from typing import Any

from twisted.logger import Logger
from zope.interface import provider

from exmta.dns import AuthDNS, OversizeAnswer, TempDNSError, auth_dns_from_config
from exmta.filters.authres import DKIMResult, auth_state
from exmta.filters.base import FilterBase
from exmta.filters.spf import common_options
from exmta.interfaces import IFilterFactory
from exmta.model import Verdict

__all__ = ["DKIMVerifyFilter", "read_message", "verify_all"]

log = Logger()

#: the largest message read into memory for DKIM/ARC (dkimpy needs the whole message)
MAX_VERIFY_OCTETS = 64 * 1024 * 1024


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value or "")


def verify_one(dns: AuthDNS, message: bytes, idx: int, min_key_bits: int = 1024, make: Any = None) -> DKIMResult:
    """Verify the idx-th DKIM-Signature (blocking). ``make``: builds the dkim.DKIM (exmta.filters.bodyhash)."""
    import dkim

    d = (make or dkim.DKIM)(message, minkey=min_key_bits, timeout=int(max(1, dns.timeout)))
    domain = selector = algorithm = b_prefix = identity = ""
    try:
        prep = d.verify_headerprep(idx)
        if not prep:
            return DKIMResult("permerror", reason="signature not found")
        sig, include_headers, sigheaders = prep
        domain, selector = _text(sig.get(b"d")), _text(sig.get(b"s"))
        algorithm, identity = _text(sig.get(b"a")), _text(sig.get(b"i"))
        b_prefix = "".join(_text(sig.get(b"b")).split())[:8]

        def done(result: str, reason: str = "") -> DKIMResult:
            return DKIMResult(result, domain, selector, algorithm, b_prefix, reason, identity)

        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            d.pk, d.keysize, d.ktag, d.seqtlsrpt = dkim.load_pk_from_dns(name, dns.dkim_txt, timeout=d.timeout)
        except TempDNSError as e:
            return done("temperror", f"key lookup failed: {e}")
        except OversizeAnswer as e:
            return done("permerror", str(e))
        except (dkim.KeyFormatError, dkim.UnknownKeyTypeError) as e:
            return done("permerror", f"bad or missing key: {e}")
        except (binascii.Error, ValueError, IndexError) as e:
            return done("permerror", f"key is not valid base64/ASN.1: {e}")
        if d.ktag == b"rsa" and d.keysize < min_key_bits:
            return done("permerror", f"RSA key too short: {d.keysize} bits (minimum {min_key_bits})")
        try:
            ok = d.verify_sig_process(sig, include_headers, sigheaders[idx], dns.dkim_txt)
        except dkim.ValidationError as e:
            text = str(e)
            return done("fail", "body hash mismatch" if "body hash" in text else text)
        if ok:
            return done("pass")
        return done("fail", "signature did not verify")
    except (dkim.MessageFormatError, dkim.ParameterError, dkim.ValidationError) as e:
        return DKIMResult("permerror", domain, selector, algorithm, b_prefix, f"malformed signature: {e}",
                          identity)
    except dkim.KeyFormatError as e:
        return DKIMResult("permerror", domain, selector, algorithm, b_prefix, f"bad key: {e}", identity)
    except dkim.DKIMException as e:
        return DKIMResult("permerror", domain, selector, algorithm, b_prefix, str(e), identity)


def count_signatures(message: bytes) -> int:
    import dkim

    try:
        d = dkim.DKIM(message)
    except dkim.DKIMException:
        return 0
    return sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")


def verify_all(dns: AuthDNS, message: bytes, min_key_bits: int = 1024, max_signatures: int = 10,
               make: Any = None) -> list[DKIMResult]:
    """One DKIMResult per DKIM-Signature (top first, at most ``max_signatures``); blocking."""
    n = count_signatures(message)
    results = [verify_one(dns, message, i, min_key_bits, make) for i in range(min(n, max_signatures))]
    if n > max_signatures:
        results.append(DKIMResult("policy", reason=f"{n - max_signatures} more signatures not checked"))
    return results


def read_message(view: Any, limit: int = MAX_VERIFY_OCTETS) -> bytes | None:
    """The whole message from a MessageView, or None when larger than ``limit``."""
    with view.open_body() as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


@provider(IFilterFactory)
class DKIMVerifyFilter(FilterBase):
    """``plugin = "dkim"``: see the module docstring."""

    KEYS = frozenset({"dns_servers", "dns_timeout", "min_key_bits", "max_signatures", "on_temperror",
                      "skip_authenticated"})

    def __init__(self, name: str, dns: AuthDNS, *, min_key_bits: int = 1024, max_signatures: int = 10,
                 on_temperror: str = "tempfail", skip_authenticated: bool = True) -> None:
        self.name = name
        self.dns = dns
        self.min_key_bits = min_key_bits
        self.max_signatures = max_signatures
        self.on_temperror = on_temperror
        self.skip_authenticated = skip_authenticated

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> DKIMVerifyFilter:
        options = common_options(config, cls.KEYS)
        for key, low, high in (("min_key_bits", 512, 16384), ("max_signatures", 1, 100)):
            if key in config:
                value = config[key]
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                    raise ValueError(f"{key} must be an integer from {low} to {high}")
                options[key] = value
        return cls(name, auth_dns_from_config(config, env), **options)

    async def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        if self.skip_authenticated and session.auth_identity:
            return Verdict.CONTINUE
        state = auth_state(session).for_message(txn)
        results = await dkim_results(self.dns, state, message, self.min_key_bits, self.max_signatures)
        for r in results:
            log.info("{filter_name}: DKIM d={domain} s={selector} a={algorithm}: {result} {reason}",
                     filter_name=self.name, domain=r.domain, selector=r.selector, algorithm=r.algorithm,
                     result=r.result, reason=r.reason)
        if (self.on_temperror == "tempfail" and any(r.result == "temperror" for r in results)
                and not any(r.result == "pass" for r in results)):
            return Verdict.tempfail(451, "4.7.5", "DKIM key lookup failed temporarily (DNS); try again later")
        return Verdict.CONTINUE


async def dkim_results(dns: AuthDNS, state: Any, message: Any, min_key_bits: int = 1024,
                       max_signatures: int = 10) -> list[DKIMResult]:
    """The DKIM results of this message: computed once, shared through the AuthState."""
    if state.dkim is not None:
        return list(state.dkim)
    results = await dns.run(_verify_view, dns, message, body_hashes(state, message), min_key_bits, max_signatures)
    state.dkim = results
    return results


def body_hashes(state: Any, view: Any) -> Any:
    """The BodyHashes of this message, shared by the DKIM and ARC filters through the AuthState."""
    from exmta.filters.bodyhash import BodyHashes

    held = getattr(state, "_body_hashes", None)
    if held is None or held[0] is not view:
        held = state._body_hashes = (view, BodyHashes(lambda: open_body_part(view)))
    return held[1]


def open_body_part(view: Any) -> Any:
    """The message file positioned at its body (blocking); ValueError when no empty line separates it."""
    f = view.open_body()
    f.seek(view.header_length)
    if f.read(2) not in (b"\r\n", b""):
        f.close()
        raise ValueError("no empty line between the header and the body")
    return f


def streamable(view: Any) -> bool:
    """Whether the body can be streamed: a view with its header block and a separator (blocking)."""
    if not hasattr(view, "raw_headers") or not getattr(view, "header_complete", True):
        return False
    try:
        open_body_part(view).close()
    except ValueError:
        return False
    return True


def _verify_view(dns: AuthDNS, view: Any, hashes: Any, min_key_bits: int, max_signatures: int) -> list[DKIMResult]:
    """On the filter pool: the header block to dkimpy, the body streamed (exmta.filters.bodyhash)."""
    from exmta.filters.bodyhash import streamed_dkim

    if streamable(view):
        return verify_all(dns, view.raw_headers + b"\r\n", min_key_bits, max_signatures,
                          lambda m, **kw: streamed_dkim(m, hashes, **kw))
    data = read_message(view)  # an odd message (no separator): whole, as before, still off the reactor
    if data is None:
        return [DKIMResult("policy", reason="message too large to verify")]
    return verify_all(dns, data, min_key_bits, max_signatures)
