"""SPF (RFC 7208) on the HELO name and the MAIL FROM address, as an ordinary filter.

The evaluation is pyspf's (every mechanism and modifier, macros, the limits
of 10 DNS-querying terms and 2 void lookups, temperror and permerror kept
apart); its DNS goes through :class:`exmta.dns.AuthDNS` (dnspython on the
filter thread pool, the configured servers only). What this filter adds is
the policy: a DNS failure is a 451 4.7.24 by default (never a silent pass),
``fail`` may be rejected (550 5.7.23), and the result is kept for DMARC and
Authentication-Results.

Config (``[filters.NAME]``, ``plugin = "spf"``): ``dns_servers``,
``dns_timeout``, ``check_helo`` (true), ``reject_fail`` (false: let DMARC
decide), ``reject_permerror`` (false), ``on_temperror`` ("tempfail" | "tag"),
``skip_authenticated`` (true).
"""
from __future__ import annotations

import ipaddress
from typing import Any

from twisted.logger import Logger
from zope.interface import provider

from exmta.dns import AuthDNS, auth_dns_from_config, using_spf_dns
from exmta.filters.authres import SPFResult, auth_state
from exmta.filters.base import FilterBase
from exmta.interfaces import IFilterFactory
from exmta.model import Verdict
from exmta.config.reader import known_keys

__all__ = ["SPFFilter", "check_spf"]

log = Logger()

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


def _idna(domain: str) -> str:
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return domain


def check_spf(dns: AuthDNS, ip: str, sender: str, helo: str, receiver: str = "unknown",
              identity: str = "mailfrom") -> SPFResult:
    """Evaluate SPF (blocking: call through ``dns.run``).

    ``sender`` empty means the null sender: RFC 7208 2.4 checks
    ``postmaster@<helo>`` instead. ``identity="helo"`` checks the HELO name.
    """
    import spf

    helo = helo or ""
    if identity == "helo":
        subject = helo
        domain = helo
        mail_from = ""
    else:
        local, _, domain = sender.rpartition("@")
        if not sender:
            subject = f"postmaster@{helo}"
            domain = helo
        else:
            subject = sender
        mail_from = sender
        domain = _idna(domain)
        if sender and not sender.isascii():
            # RFC 8616: an SMTPUTF8 local part cannot be a macro-safe ASCII string; check the domain
            mail_from = f"{local.encode('ascii', 'replace').decode()}@{domain}".replace("?", "x")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return SPFResult("none", identity, domain, subject, f"client address {ip!r} is not an IP address")
    if not domain or "." not in domain.strip("."):
        return SPFResult("none", identity, domain, subject, "no domain to check")
    q = spf.query(i=ip, s=mail_from if identity != "helo" else "", h=_idna(helo) or domain,
                  receiver=receiver, timeout=dns.timeout, querytime=max(dns.timeout * 4, 20))
    with using_spf_dns(dns):
        try:
            result, _code, explanation = q.check()
        except spf.TempError as e:
            result, explanation = "temperror", str(e)
        except spf.PermError as e:
            result, explanation = "permerror", str(e)
    result = {"error": "temperror", "unknown": "permerror", "ambiguous": "permerror"}.get(result, result)
    if result not in RESULTS:
        result = "permerror"
    return SPFResult(result, identity, domain, subject, explanation or "")


@provider(IFilterFactory)
class SPFFilter(FilterBase):
    """``plugin = "spf"``: see the module docstring."""

    KEYS = frozenset({"dns_servers", "dns_timeout", "check_helo", "reject_fail", "reject_permerror",
                      "on_temperror", "skip_authenticated"})

    def __init__(self, name: str, dns: AuthDNS, receiver: str, *, check_helo: bool = True,
                 reject_fail: bool = False, reject_permerror: bool = False, on_temperror: str = "tempfail",
                 skip_authenticated: bool = True) -> None:
        self.name = name
        self.dns = dns
        self.receiver = receiver
        self.check_helo = check_helo
        self.reject_fail = reject_fail
        self.reject_permerror = reject_permerror
        self.on_temperror = on_temperror
        self.skip_authenticated = skip_authenticated

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> SPFFilter:
        options = common_options(config, cls.KEYS)
        for key in ("check_helo", "reject_fail", "reject_permerror"):
            if key in config:
                options[key] = bool_option(config, key)
        return cls(name, auth_dns_from_config(config, env), env.hostname, **options)

    def _skip(self, session: Any) -> bool:
        return bool(self.skip_authenticated and session.auth_identity)

    async def on_helo(self, session: Any) -> Verdict:
        if not self.check_helo or self._skip(session) or not session.helo_name:
            return Verdict.CONTINUE
        state = auth_state(session)
        helo = session.helo_name
        if helo.startswith("["):  # an address literal has no SPF record
            state.helo = SPFResult("none", "helo", helo, helo, "HELO is an address literal")
            return Verdict.CONTINUE
        result = await self.dns.run(check_spf, self.dns, session.peer_ip, "", helo, self.receiver, "helo")
        state.helo = result
        log.info("{filter_name}: SPF helo={helo} ip={ip}: {result} ({explanation})", filter_name=self.name,
                 helo=helo, ip=session.peer_ip, result=result.result, explanation=result.explanation)
        return Verdict.CONTINUE  # HELO results are reported, not enforced (RFC 7208 2.3 is optional)

    async def on_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
        if self._skip(session):
            return Verdict.CONTINUE
        state = auth_state(session)
        sender_text = str(sender)
        if not sender_text and state.helo is not None:
            result = SPFResult(state.helo.result, "helo", state.helo.domain,
                               f"postmaster@{session.helo_name}", state.helo.explanation)
        else:
            result = await self.dns.run(check_spf, self.dns, session.peer_ip, sender_text,
                                        session.helo_name or "", self.receiver, "mailfrom")
        state.mailfrom = result
        state.mailfrom_sender = sender_text
        log.info("{filter_name}: SPF mailfrom=<{sender}> ip={ip}: {result} ({explanation})",
                 filter_name=self.name, sender=sender_text, ip=session.peer_ip, result=result.result,
                 explanation=result.explanation)
        if result.result == "temperror" and self.on_temperror == "tempfail":
            return Verdict.tempfail(451, "4.7.24", f"SPF check of {result.domain} failed temporarily (DNS); "
                                                   "try again later")
        if result.result == "fail" and self.reject_fail:
            return Verdict.reject(550, "5.7.23", f"SPF: {result.domain} does not authorise {session.peer_ip} "
                                                  "to send its mail")
        if result.result == "permerror" and self.reject_permerror:
            return Verdict.reject(550, "5.7.24", f"SPF record of {result.domain} is broken: "
                                                  f"{result.explanation}"[:300])
        return Verdict.CONTINUE


# ---------------------------------------------------------------- shared option parsing


def bool_option(config: dict[str, Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value


def common_options(config: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """Check unknown keys and parse on_temperror / skip_authenticated (errors name the key)."""
    known_keys(config, keys)
    options: dict[str, Any] = {}
    if "on_temperror" in config:
        value = config["on_temperror"]
        if value not in ("tempfail", "tag"):
            raise ValueError(f"on_temperror must be \"tempfail\" or \"tag\", not {value!r}")
        options["on_temperror"] = value
    if "skip_authenticated" in config:
        options["skip_authenticated"] = bool_option(config, "skip_authenticated")
    return options
