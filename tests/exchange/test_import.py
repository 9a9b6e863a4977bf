"""``exmta import exchange``: cmdlet JSON of a typical hybrid organisation -> a config that starts."""
from __future__ import annotations

import json
import tomllib
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from exmta.cli import main
from exmta.config.load import load_config, parse_config
from exmta.exchange.importer import (
    ImportOptions, import_exchange, load_objects, parse_address_space, parse_binding, parse_ranges, parse_size,
    parse_timespan,
)
from support.tlscerts import TestPKI

FIXTURES = Path(__file__).parent / "fixtures"
FILES = [FIXTURES / n for n in ("receive-connectors.json", "send-connectors.json", "accepted-domains.json")]
#: properties the issue asks to map (and the helpers they need); everything else must be listed
MAPPED = {
    "Bindings", "RemoteIPRanges", "PermissionGroups", "AuthMechanism", "RequireTLS", "MaxMessageSize",
    "MaxRecipientsPerMessage", "Fqdn", "Banner", "ConnectionInactivityTimeout", "MaxInboundConnection",
    "MaxInboundConnectionPerSource", "MessageRateLimit", "MessageRateSource", "ProtocolLoggingLevel",
    "TransportRole", "Enabled", "AddressSpaces", "SmartHosts", "DNSRoutingEnabled", "TlsAuthLevel", "TlsDomain",
    "TlsCertificateName", "Port", "IgnoreSTARTTLS", "CloudServicesMailEnabled", "SmartHostAuthMechanism",
    "ConnectionInactivityTimeOut", "SmtpMaxMessagesPerConnection", "DomainName", "DomainType",
}


def objects() -> list[dict]:
    return [o for f in FILES for o in load_objects(f.read_bytes())]


def test_value_formats_as_exchange_prints_them() -> None:
    assert parse_ranges(["192.168.5.10", "192.168.5.20-192.168.5.23", "10.1.0.1/16",
                         "fe80::39bd:88f7:6969:d223%11", {"LowerBound": "172.16.0.0", "UpperBound": "172.16.0.255"}]) \
        == ["192.168.5.10/32", "192.168.5.20/30", "10.1.0.0/16", "fe80::39bd:88f7:6969:d223/128", "172.16.0.0/24"]
    assert parse_ranges(["0.0.0.0-255.255.255.255", "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]) \
        == ["0.0.0.0/0", "::/0"]
    assert parse_size("36 MB (37,748,736 bytes)") == 37748736 and parse_size("25 MB") == 25 * 1024 * 1024
    assert parse_size("Unlimited") is None
    assert parse_timespan("00:10:00") == 600 and parse_timespan("1.00:00:30") == 86430
    assert parse_address_space("SMTP:*;1") == ("SMTP", "*", 1)
    assert parse_address_space("contoso.com;2") == ("SMTP", "contoso.com", 2)
    assert parse_address_space("smtp:*.contoso.com") == ("SMTP", "*.contoso.com", 1)
    assert parse_address_space("X400:c=US;a= ;p=Contoso;5")[0] == "X400"
    assert parse_binding("0.0.0.0:25") == "tcp:25" and parse_binding("10.10.1.1:25") == "tcp:25:interface=10.10.1.1"
    assert parse_binding("[::]:587") == "tcp6:587:interface=\\:\\:"
    assert parse_binding({"Address": "10.0.0.1", "Port": 2525}) == "tcp:2525:interface=10.0.0.1"


def test_utf16_as_windows_powershell_redirects_it() -> None:
    data = FILES[2].read_text(encoding="utf-8")
    assert load_objects("\ufeff".encode("utf-16-le") + data.encode("utf-16-le")) == load_objects(data.encode())
    single = json.dumps(json.loads(data)[0]).encode()  # one object: ConvertTo-Json prints no array
    assert len(load_objects(single)) == 1


def test_every_property_is_mapped_or_listed_with_a_reason() -> None:
    objs = objects()
    result = import_exchange(objs, ImportOptions(mailbox_host="[10.0.5.10]"))
    listed: dict[str, set[str]] = {}
    for label, prop, why in result.unmapped:
        assert why, (label, prop)
        listed.setdefault(label, set()).add(prop.split(" ")[0])
    for o in objs:
        labels = [lab for lab in listed if repr(o.get("Name")) in lab]
        props = set().union(*(listed[lab] for lab in labels)) if labels else set()
        if "*" in props:
            continue  # the Exchange-internal HubTransport connector, skipped as a whole (and said so)
        missing = set(o) - MAPPED - props
        assert not missing, (o.get("Name"), sorted(missing))
    text = result.toml
    assert "AuthMechanism Integrated (NTLM/Kerberos (Integrated) is not offered" in text
    assert "'Default EX1': Exchange-internal hop" in text
    assert "--relay-connector \"Anonymous Relay\"" in text  # the relay right is not in the JSON: it says so
    assert "relay_networks" not in text
    assert "run `exmta exo check` on the result" in text  # the hybrid connector
    basic = {"Name": "To EXO", "AddressSpaces": ["SMTP:*;1"], "DNSRoutingEnabled": False, "Port": 587,
             "SmartHosts": ["smtp.office365.com"], "SmartHostAuthMechanism": "BasicAuthRequireTLS",
             "RequireTLS": True}
    assert any("MC786329" in n and "xoauth2" in n for n in import_exchange([basic]).notes)


def test_the_hybrid_organisation_checks_and_starts(tmp_path: Path, smtp_sink_factory: Callable[..., object],
                                                    exmta_factory: Callable[..., object],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from exmta.auth.users import PasswordHasher, UserRecord, UsersFile

    pki = TestPKI(tmp_path / "pki")
    cert = pki.server("mail.contoso.com")
    users = tmp_path / "users.jsonl"
    UsersFile(str(users)).write({"alice@contoso.com": UserRecord("alice@contoso.com", PasswordHasher().hash("pw"),
                                                                 ["alice@contoso.com"])})
    mailbox = smtp_sink_factory()
    out = tmp_path / "imported.toml"
    assert main(["import", "exchange", *map(str, FILES), "-o", str(out), "--tls-cert", str(cert.cert),
                 "--tls-key", str(cert.key), "--auth-backend", str(users), "--relay-connector", "Anonymous Relay",
                 "--mailbox-host", mailbox.next_hop, "--data-dir", str(tmp_path / "data")]) == 0
    err = capsys.readouterr().err
    assert "AuthMechanism Integrated" in err and "not mapped" in err
    text = out.read_text()

    config = load_config(str(out))  # check-config's own loader
    rc = {r.name: r for r in config.receive}
    assert sorted(rc) == ["anonymous-relay", "client-frontend-ex1", "default-frontend-ex1"]
    relay = rc["anonymous-relay"]
    assert relay.remote_ranges[0] == "192.168.5.10/32" and relay.relay_networks == relay.remote_ranges
    assert relay.max_message_size == 26214400 and relay.max_recipients == 100 and relay.banner == "Printer relay"
    client = rc["client-frontend-ex1"]
    assert client.auth == ("PLAIN", "LOGIN") and client.permission_groups == ("authenticated",)
    assert client.tls is not None and client.listen == ("tcp:587",)
    assert rc["default-frontend-ex1"].protocol_log == "verbose"
    hybrid = next(s for s in config.send if s.name.startswith("outbound-to-office-365"))
    assert (hybrid.tls, hybrid.tls_auth_level, hybrid.tls_domain) == ("mandatory", "domain",
                                                                     "mail.protection.outlook.com")
    assert hybrid.send_organization_headers and hybrid.tls_certificate == str(cert.cert)
    assert [(r.domains, r.cost) for r in config.routes][:2] == [(("*",), 1), (("contoso.mail.onmicrosoft.com",), 1)]
    assert {d.name: d.kind for d in config.accepted_domains} == {"contoso.com": "authoritative",
                                                                 "fabrikam.com": "internal_relay"}
    assert main(["check-config", str(out)]) == 0

    # start it: only the listening ports and the admin API (a fixed port by default) are changed
    started = (text.replace('"tcp:25"', '"tcp:{port}:interface=127.0.0.1"')
               .replace('"tcp:587"', '"tcp:{submission}:interface=127.0.0.1"') + "\n[admin]\nenabled = false\n")
    from support.procs import free_port
    exmta = exmta_factory(toml=started, subst={"submission": free_port()})
    with smtplib.SMTP(exmta.host, exmta.port, timeout=30) as s:
        assert s.ehlo()[0] == 250 and s.has_extn("starttls")
        s.sendmail("printer@example.net", ["alice@contoso.com"], b"Subject: imported\r\n\r\nhello\r\n")
    (got,) = mailbox.wait_for_rcpts(["alice@contoso.com"])
    assert b"Subject: imported" in got.content


def test_two_servers_proxy_connectors_and_odd_send_values() -> None:
    relay = next(o for o in objects() if o.get("Name") == "Anonymous Relay")
    second = dict(relay, Server="EX2", Identity="EX2\\Anonymous Relay")
    proxy = {"Name": "Outbound Proxy Frontend EX1", "Server": "EX1", "TransportRole": "FrontendTransport",
             "Bindings": ["[::]:717", "0.0.0.0:717"], "RemoteIPRanges": ["0.0.0.0-255.255.255.255"],
             "AuthMechanism": "Tls, BasicAuth, BasicAuthRequireTLS, ExchangeServer",
             "PermissionGroups": "ExchangeServers"}
    send = {"Name": "Partner", "AddressSpaces": ["SMTP:partner.example;5", "SMTP:bad domain;1", "X400:c=US;a= ;p=P;1"],
            "DNSRoutingEnabled": False, "SmartHosts": ["2001:db8::25", "[192.0.2.25]"], "Port": 587,
            "RequireTLS": False, "Enabled": True}
    result = import_exchange([relay, second, proxy, send])
    config = parse_config(tomllib.loads(result.toml))
    assert [r.name for r in config.receive] == ["anonymous-relay"]  # EX1's; EX2's is named, not merged
    assert any("receive connectors of EX2 not imported" in n for n in result.notes)
    assert any("Outbound Proxy Frontend EX1" in n and "not imported" in n for n in result.notes)
    (partner,) = config.send
    assert [(h.host, h.port) for h in partner.smarthosts] == [("2001:db8::25", 587), ("192.0.2.25", 587)]
    assert [(r.domains, r.cost) for r in config.routes] == [(("partner.example",), 5)]
    whys = sorted(w for o, p, w in result.unmapped if "Partner" in o and p == "AddressSpaces")
    assert whys == ["SMTP:bad domain;1: 'bad domain' is not a domain name (use \"example.com\" or \"*.example.com\")",
                    "X400:c=US;a= ;p=P;1: only SMTP address spaces are routed"]
    only_ex2 = import_exchange([relay, second], ImportOptions(server="EX2"))
    assert "EX1" in "\n".join(only_ex2.notes)


def test_export_clixml_gives_the_same_connector_as_the_json() -> None:
    """Export-Clixml (UTF-16, as Windows PowerShell writes it) reads like ConvertTo-Json."""
    from exmta.exchange.clixml import load_clixml

    xml = (FIXTURES / "anonymous-relay.xml").read_text(encoding="utf-8")
    from_xml = load_objects("\ufeff".encode("utf-16-le") + xml.encode("utf-16-le"))
    (obj,) = from_xml
    assert obj["Bindings"] == ["0.0.0.0:25"] and obj["MaxMessageSize"] == "25 MB (26,214,400 bytes)"
    assert obj["TarpitInterval"] == "00:00:05" and obj["DefaultDomain"] is None and obj["ChunkingEnabled"] is True
    json_obj = next(o for o in objects() if o.get("Name") == "Anonymous Relay")
    opts = ImportOptions(relay_connectors=("Anonymous Relay",))
    a = parse_config(tomllib.loads(import_exchange(from_xml, opts).toml)).receive
    b = parse_config(tomllib.loads(import_exchange([json_obj], opts).toml)).receive
    assert a == b
    with pytest.raises(ValueError, match="DOCTYPE"):
        load_clixml('<!DOCTYPE x [<!ENTITY a "b">]><Objs/>')
    with pytest.raises(ValueError, match="root element is not <Objs>"):
        load_clixml("<Other/>")
