"""ARC (RFC 8617): validate the chain of an incoming message and record ``arc=`` for Authentication-Results.

dkimpy's ARC implementation checks every ARC-Seal and the newest
ARC-Message-Signature; keys come through :class:`exmta.dns.AuthDNS`. The
result is reported only (ARC informs local policy, it never rejects here).

Config (``plugin = "arc"``): ``dns_servers``, ``dns_timeout``,
``min_key_bits`` (1024), ``skip_authenticated``.
"""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import provider

from exmta.dns import AuthDNS, OversizeAnswer, TempDNSError, auth_dns_from_config
from exmta.filters.authres import ARCResult, auth_state
from exmta.filters.base import FilterBase
from exmta.filters.dkim_verify import body_hashes, read_message, streamable
from exmta.filters.spf import common_options
from exmta.interfaces import IFilterFactory
from exmta.model import Verdict

__all__ = ["ARCVerifyFilter", "verify_arc"]

log = Logger()


def verify_arc(dns: AuthDNS, message: bytes, min_key_bits: int = 1024, hashes: Any = None) -> ARCResult:
    """Validate the ARC chain (blocking). With ``hashes`` (exmta.filters.bodyhash.BodyHashes),
    ``message`` is the header block only and the body hashes are streamed.

    A chain dkimpy finds broken (DKIMException) fails; a DNS timeout is temperror. Anything else
    is a bug (ours or dkimpy's), not a statement about the sender: it is raised, and the filter
    logs it with its traceback and records temperror.
    """
    import dkim

    instances = sum(1 for line in message.split(b"\r\n\r\n", 1)[0].split(b"\n")
                    if line[:9].lower() == b"arc-seal:")
    if not instances:
        return ARCResult("none")
    try:
        if hashes is not None:
            from exmta.filters.bodyhash import streamed_arc

            # a DKIMException (a broken chain) fails below, as dkim.arc_verify would; a DNS timeout is temperror
            cv, _results, reason = streamed_arc(message, hashes, minkey=min_key_bits).verify(dnsfunc=dns.dkim_txt)
        else:
            cv, _results, reason = dkim.arc_verify(message, dnsfunc=dns.dkim_txt, minkey=min_key_bits)
    except (TempDNSError, dkim.DnsTimeoutError) as e:
        return ARCResult("temperror", f"key lookup failed: {e}", instances)
    except OversizeAnswer as e:
        return ARCResult("fail", str(e), instances)
    except dkim.DKIMException as e:  # a broken chain is a failing chain
        return ARCResult("fail", f"{type(e).__name__}: {e}", instances)
    result = cv.decode("ascii", "replace") if isinstance(cv, bytes) else str(cv)
    return ARCResult(result.lower(), str(reason or ""), instances)


def _verify_view(dns: AuthDNS, view: Any, hashes: Any, min_key_bits: int) -> ARCResult:
    """On the filter pool: the header block to dkimpy, the body streamed (exmta.filters.bodyhash)."""
    if streamable(view):
        return verify_arc(dns, view.raw_headers + b"\r\n", min_key_bits, hashes)
    data = read_message(view)  # an odd message (no separator): whole, as before, still off the reactor
    if data is None:
        return ARCResult("none", "message too large to verify")
    return verify_arc(dns, data, min_key_bits)


@provider(IFilterFactory)
class ARCVerifyFilter(FilterBase):
    """``plugin = "arc"``: record the ARC chain validation result."""

    KEYS = frozenset({"dns_servers", "dns_timeout", "min_key_bits", "skip_authenticated"})

    def __init__(self, name: str, dns: AuthDNS, *, min_key_bits: int = 1024, skip_authenticated: bool = True,
                 on_temperror: str = "tag") -> None:
        self.name = name
        self.dns = dns
        self.min_key_bits = min_key_bits
        self.skip_authenticated = skip_authenticated

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> ARCVerifyFilter:
        options = common_options(config, cls.KEYS)
        if "min_key_bits" in config:
            value = config["min_key_bits"]
            if not isinstance(value, int) or isinstance(value, bool) or not 512 <= value <= 16384:
                raise ValueError("min_key_bits must be an integer from 512 to 16384")
            options["min_key_bits"] = value
        return cls(name, auth_dns_from_config(config, env), **options)

    async def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        if self.skip_authenticated and session.auth_identity:
            return Verdict.CONTINUE
        state = auth_state(session).for_message(txn)
        try:
            state.arc = await self.dns.run(_verify_view, self.dns, message, body_hashes(state, message),
                                           self.min_key_bits)
        except Exception as e:
            log.failure("{filter_name}: ARC validation raised; recorded as temperror", filter_name=self.name)
            state.arc = ARCResult("temperror", f"internal error: {type(e).__name__}")
        log.info("{filter_name}: ARC {result} ({instances} instance(s)) {reason}", filter_name=self.name,
                 result=state.arc.result, instances=state.arc.instances, reason=state.arc.reason)
        return Verdict.CONTINUE
