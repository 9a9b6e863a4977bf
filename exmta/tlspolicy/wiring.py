"""Give each MX-delivering SMTP send connector its TLS policy engine (MTA-STS, DANE, TLS-RPT)."""
from __future__ import annotations

from typing import Any

from exmta.tlspolicy.engine import TLSPolicyEngine

__all__ = ["attach_tls_policy"]


def attach_tls_policy(config: Any, connectors: dict[str, Any], reactor: Any, threadpool: Any,
                      reporter: Any = None) -> list[TLSPolicyEngine]:
    """One engine per SMTP connector that looks up MX (no smart hosts); returns them.

    Connectors with smart hosts, LMTP or Maildir deliver to places the
    administrator chose, where the connector's own TLS settings apply.
    """
    tp = config.tls_policy
    engines: list[TLSPolicyEngine] = []
    if not (tp.mta_sts or tp.dane or tp.tls_rpt):  # tls_rpt alone: "no-policy-found" reports
        return engines
    if reporter is None and tp.tls_rpt:
        import os

        from exmta.tlspolicy.report import TLSResultLog

        reporter = TLSResultLog(os.path.join(tp.cache_dir or config.data_dir, "tlsrpt", "results.jsonl"), reactor)
    for sc in config.send:
        connector = connectors.get(sc.name)
        if sc.kind != "smtp" or sc.smarthosts or connector is None or not hasattr(connector, "tls_policy"):
            continue
        client = (sc.tls_certificate, sc.tls_key) if sc.tls_certificate else None
        engine = TLSPolicyEngine(tp, reactor, reactor, threadpool, connector.resolver, reporter=reporter,
                                 client_certificate=client)
        connector.tls_policy = engine
        engines.append(engine)
    return engines
