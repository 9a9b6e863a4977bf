"""TLS for receive and send connectors.

* :mod:`exmta.tls.certs`: read and check PEM certificates and keys (expiry, key match);
* :mod:`exmta.tls.context`: server contexts (STARTTLS, implicit TLS, SNI, legacy ranges, reload);
* :mod:`exmta.tls.verify`: the session gate (require_tls, partner client certificates);
* :mod:`exmta.tls.client`: send connector contexts (validation levels, client certificate);
* :mod:`exmta.tls.config`: the TOML keys, read by :mod:`exmta.config.load`.
"""
