"""ip_in: the one address-in-networks check of receive ranges, TLS legacy/plaintext networks, AUTH before TLS
and the admin API's allowed_networks."""
from __future__ import annotations

import ipaddress

from exmta.admin import api
from exmta.auth import smtp as auth_smtp
from exmta.receive.ranges import ip_in
from exmta.tls import context

NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


def test_ip_in_handles_mapped_zone_and_garbage() -> None:
    assert ip_in("192.0.2.7", NETS)
    assert ip_in("::ffff:192.0.2.7", NETS)  # dual-stack socket
    assert ip_in("2001:db8::1%eth0", NETS)  # zone id dropped
    assert not ip_in("198.51.100.1", NETS)
    assert not ip_in("192.0.2.7", ())
    assert not ip_in(None, NETS) and not ip_in("", NETS) and not ip_in("not an ip", NETS)


def test_tls_auth_and_admin_use_it() -> None:
    assert context.ip_in is ip_in and auth_smtp.ip_in is ip_in and api.ip_in is ip_in
