"""The ``[tls_policy]`` section: MTA-STS, DANE and TLS-RPT for mail sent by MX lookup."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from exmta.config.reader import parse_duration, parse_size
from exmta.config.reader import boolean as _bool
from exmta.config.reader import domain as _domain
from exmta.config.reader import integer as _int
from exmta.config.reader import list_of as _list_of
from exmta.config.reader import nameserver as _nameserver
from exmta.config.reader import readable_file as _readable_file
from exmta.config.reader import string as _str

__all__ = ["OVERRIDES", "TLSPolicyConfig", "read_tls_policy"]

#: per-domain overrides: "none" ignores MTA-STS and DANE for the domain, "testing" delivers
#: (and reports) where an enforce policy or DANE would defer, "enforce" is the default behaviour
OVERRIDES = ("none", "testing", "enforce")


@dataclass(frozen=True)
class TLSPolicyConfig:
    mta_sts: bool = True                  # honour MTA-STS policies (RFC 8461)
    dane: bool = False                    # honour DANE TLSA (RFC 7672); needs dane_resolvers
    dane_resolvers: tuple[str, ...] = ()  # validating resolvers whose AD bit is trusted ("ip[:port]")
    ca_file: str | None = None            # PEM roots for MTA-STS (policy host and MX); None = system store
    cache_dir: str | None = None          # default <data_dir>/tls-policy
    fetch_timeout: float = 30.0           # whole HTTPS policy fetch
    max_policy_size: int = 64 * 1024      # octets
    txt_recheck: float = 300.0            # seconds a cached policy is used before the TXT id is looked at again
    https_port: int = 443                 # the policy host's port (tests only; RFC 8461 says 443)
    overrides: dict[str, str] = field(default_factory=dict)  # domain -> none | testing | enforce
    tls_rpt: bool = False                 # record results and send daily RFC 8460 reports
    tls_rpt_organization: str = ""        # organization-name in reports (default: the server hostname)
    tls_rpt_contact: str = ""             # contact-info in reports (default: postmaster@hostname)


def read_tls_policy(r: Any, data_dir: str) -> TLSPolicyConfig:
    """Read ``[tls_policy]`` with the loader's reader ``r`` (problems name the key)."""
    d = TLSPolicyConfig()
    overrides: dict[str, str] = {}
    sub = r.sub("overrides")
    for name in list(sub.table):
        value = sub.get(name, "enforce", lambda v: v if v in OVERRIDES else _bad(v))
        try:
            overrides[_domain(name)] = value
        except ValueError as e:
            sub.error(name, str(e))
    sub.finish()
    cfg = TLSPolicyConfig(
        mta_sts=r.get("mta_sts", d.mta_sts, _bool),
        dane=r.get("dane", d.dane, _bool),
        dane_resolvers=r.get("dane_resolvers", d.dane_resolvers, _list_of(_nameserver)),
        ca_file=r.get("ca_file", d.ca_file, _readable_file),
        cache_dir=r.get("cache_dir", None, _str) or os.path.join(data_dir, "tls-policy"),
        fetch_timeout=r.get("fetch_timeout", d.fetch_timeout, parse_duration),
        max_policy_size=r.get("max_policy_size", d.max_policy_size, parse_size),
        txt_recheck=r.get("txt_recheck", d.txt_recheck, parse_duration),
        https_port=r.get("https_port", d.https_port, _int(1, 65535)),
        overrides=overrides,
        tls_rpt=r.get("tls_rpt", d.tls_rpt, _bool),
        tls_rpt_organization=r.get("tls_rpt_organization", d.tls_rpt_organization, _str),
        tls_rpt_contact=r.get("tls_rpt_contact", d.tls_rpt_contact, _str),
    )
    if cfg.dane and not cfg.dane_resolvers:
        r.error("dane_resolvers", "dane = true needs the validating resolver(s) whose AD bit to trust, "
                "e.g. [\"127.0.0.1:53\"] for a local unbound")
    r.finish()
    return cfg


def _bad(value: Any) -> str:
    raise ValueError(f"must be one of {', '.join(OVERRIDES)}, not {value!r}")
