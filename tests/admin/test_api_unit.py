"""Admin web tree without a network: address and token checks; `exmta track` filters and formats."""
from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web import resource
from twisted.web.test.requesthelper import DummyRequest

from exmta.admin.api import AdminRoot, TokenGuard, make_admin_root, queue_name
from exmta.admin.client import url_for_endpoint
from exmta.admin.token import ensure_token
from exmta.admin.track import Filter, FilterError, format_csv, format_table, history, parse_time, search

TOKEN = "s3cret-token"


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


def get(root: resource.Resource, path: bytes, client: Any, auth: str | None = None) -> tuple[int, bytes, Any]:
    request = DummyRequest(path.split(b"/")[1:])
    request.client = client
    if auth is not None:
        request.requestHeaders.addRawHeader(b"authorization", auth.encode())
    child = resource.getChildForRequest(root, request)
    body = child.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request.responseCode or 200, b"".join(request.written), request


def tree() -> AdminRoot:
    root = make_admin_root(ops=None, token=lambda: TOKEN, allowed_networks=["127.0.0.0/8", "::1/128"],  # type: ignore[arg-type]
                           children={b"hello": Hello()}, public={b"healthz": Hello()})
    return root


LOCAL = IPv4Address("TCP", "127.0.0.1", 5000)


def test_token_required_on_guarded_children() -> None:
    root = tree()
    for auth in (None, "Bearer nope", f"Bearer {TOKEN}x", TOKEN, "Basic !!!",
                 "Basic " + base64.b64encode(b"admin:nope").decode()):
        status, body, request = get(root, b"/hello", LOCAL, auth)
        assert status == 401, auth
        assert json.loads(body)["error"] == "the admin API needs the admin token"
        challenges = request.responseHeaders.getRawHeaders(b"www-authenticate")
        assert challenges == [b'Bearer realm="exmta"']  # no Basic prompt: a browser must not remember it here
    assert get(root, b"/hello", LOCAL, f"Bearer {TOKEN}")[:2] == (200, b"hello")
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert get(root, b"/hello", LOCAL, f"Basic {basic}")[0] == 401  # Basic only where mounted with basic=True
    root.putChild(b"page", TokenGuard(Hello(), root.token, basic=True))
    assert get(root, b"/page", LOCAL, f"Basic {basic}")[:2] == (200, b"hello")
    assert get(root, b"/page", LOCAL)[2].responseHeaders.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="exmta"', b'Basic realm="exmta"']
    assert get(root, b"/healthz", LOCAL)[:2] == (200, b"hello")  # public children need no token


@pytest.mark.parametrize("client,allowed", [
    (IPv4Address("TCP", "127.0.0.1", 1), True),
    (IPv6Address("TCP", "::1", 1), True),
    (IPv6Address("TCP", "::ffff:127.0.0.1", 1), True),
    (IPv4Address("TCP", "192.0.2.1", 1), False),
    (IPv6Address("TCP", "2001:db8::1", 1), False),
    (UNIXAddress(b"/run/exmta/admin.sock"), True),
])
def test_address_check_comes_first(client: Any, allowed: bool) -> None:
    root = tree()
    for path in (b"/hello", b"/healthz", b"/api/queues"):
        status, body, _ = get(root, path, client, f"Bearer {TOKEN}")
        if allowed:
            assert status != 403
        else:
            assert status == 403 and "may not use the admin API" in json.loads(body)["error"], path


def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "admin.token"
    token = ensure_token(str(path))
    assert path.stat().st_mode & 0o777 == 0o600 and len(token) >= 40
    assert ensure_token(str(path)) == token
    path.chmod(0o644)
    assert ensure_token(str(path)) == token and path.stat().st_mode & 0o777 == 0o600


def test_endpoint_to_url() -> None:
    assert url_for_endpoint("tcp:8025:interface=127.0.0.1") == "http://127.0.0.1:8025"
    assert url_for_endpoint("tcp:port=9000") == "http://127.0.0.1:9000"
    assert url_for_endpoint(r"tcp6:8025:interface=\:\:1") == "http://[::1]:8025"
    assert url_for_endpoint("unix:/run/exmta/admin.sock:mode=600") == "unix:/run/exmta/admin.sock"
    assert queue_name("out", None) == "out" and queue_name("out", "example.net") == "out/example.net"


# ---------------------------------------------------------------- exmta track

def args(**kw: Any) -> argparse.Namespace:
    base = dict(sender=None, recipient=None, message_id=None, queue_id=None, event=None, connector=None,
                start=None, end=None)
    base.update(kw)
    return argparse.Namespace(**base)


NOW = 1_800_000_000.0


def test_filter_parsing_and_errors() -> None:
    f = Filter.from_args(args(sender="<A@Example.ORG>", recipient=["b@x.test"], message_id="m@x",
                              queue_id="abc1", event=["defer,send"], start="2h", end="2027-01-15T08:00:00Z"), NOW)
    assert (f.sender, f.recipients, f.message_id, f.queue_id) == ("a@example.org", ["b@x.test"], "<m@x>", "ABC1")
    assert f.events == {"DEFER", "SEND"} and f.start == NOW - 7200 and f.end == NOW
    assert parse_time("2027-01-15", NOW) == 1_799_971_200.0 and parse_time("1700000000", NOW) == 1.7e9
    for bad, text in ((dict(event=["BOUNCE"]), "unknown event"), (dict(start="tomorrow"), "is not a time"),
                      (dict(queue_id="../x"), "is not a queue id"), (dict(sender=""), "empty address"),
                      (dict(start="1h", end="2h"), "--start is after --end"), (dict(message_id="<>"), "empty")):
        with pytest.raises(FilterError, match=text):
            Filter.from_args(args(**bad), NOW)


def write_log(path: Path, records: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_search_history_and_formats(tmp_path: Path) -> None:
    log = tmp_path / "tracking.jsonl"
    base = {"sender": "a@x.test", "recipients": ["b@y.test"], "message_id": "<m@x.test>"}
    write_log(tmp_path / "tracking.jsonl.20270101T000000", [
        {**base, "timestamp": 10.0, "event_id": "RECEIVE", "queue_id": "Q1", "connector": "default"},
        '{"timestamp": 11, "event_id": "DEF',   # truncated
    ])
    write_log(log, [
        {**base, "timestamp": 20.0, "event_id": "DEFER", "queue_id": "Q1", "connector": "out",
         "reply": "451 4.3.0 later", "latency": 10.0},
        "\x00garbage",
        {**base, "timestamp": 30.0, "event_id": "FAIL", "queue_id": "Q1", "connector": "out", "reply": "550 5.1.1 no"},
        {"timestamp": 30.5, "event_id": "DSN", "queue_id": "Q1", "dsn_queue_id": "Q2", "sender": "a@x.test",
         "recipients": ["b@y.test"]},
        {"timestamp": 31.0, "event_id": "RECEIVE", "queue_id": "Q2", "sender": "", "recipients": ["a@x.test"]},
        {"timestamp": 32.0, "event_id": "SEND", "queue_id": "Q2", "sender": "", "recipients": ["a@x.test"],
         "tls": "TLSv1.3 X", "tls_version": "TLSv1.3"},
    ])
    warn = io.StringIO()
    got = search(str(log), Filter.from_args(args(recipient=["B@Y.TEST"]), NOW), warn)
    assert [(r["event_id"], r["queue_id"]) for r in got] == [("RECEIVE", "Q1"), ("DEFER", "Q1"), ("FAIL", "Q1"),
                                                            ("DSN", "Q1")]
    assert "tracking.jsonl.20270101T000000:2: skipped a corrupt or truncated line" in warn.getvalue()
    assert "tracking.jsonl:2: skipped" in warn.getvalue()
    whole = history(str(log), Filter.from_args(args(message_id="<m@x.test>"), NOW))
    assert [r["event_id"] for r in whole] == ["RECEIVE", "DEFER", "FAIL", "DSN"]
    dsn = history(str(log), Filter.from_args(args(queue_id="Q2"), NOW))
    assert [(r["event_id"], r["queue_id"]) for r in dsn] == [("DSN", "Q1"), ("RECEIVE", "Q2"), ("SEND", "Q2")]
    table = format_table(whole).splitlines()
    assert table[0].split() == ["TIME", "EVENT", "QUEUE_ID", "SOURCE", "CONNECTOR", "SENDER", "RECIPIENTS", "REPLY"]
    assert table[2].split()[2:4] == ["DEFER", "Q1"] and table[2].endswith("451 4.3.0 later latency=10.0s")
    assert table[1].startswith("1970-01-01 00:00:10.000Z")
    rows = format_csv(whole).splitlines()
    assert rows[0].split(",")[:3] == ["timestamp", "event_id", "queue_id"] and rows[1].startswith("10.0,RECEIVE,Q1")
    only_fail = search(str(log), Filter.from_args(args(event=["FAIL"], connector="out"), NOW))
    assert [r["reply"] for r in only_fail] == ["550 5.1.1 no"]
    window = search(str(log), Filter.from_args(args(start="15", end="30"), NOW))
    assert [r["timestamp"] for r in window] == [20.0, 30.0]


def test_admin_service_without_a_usable_token_stays_off(tmp_path: Path) -> None:
    """An empty token file: the admin API does not listen (logged), the rest of the server is not stopped."""
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher
    from twisted.web import server

    from exmta.admin.service import AdminService

    path = tmp_path / "admin.token"
    path.write_text("\n")
    path.chmod(0o600)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        svc = AdminService(Clock(), ("tcp:0:interface=127.0.0.1",), server.Site(resource.Resource()), str(path))
        d = svc.startService()
        out: list[Any] = []
        d.addBoth(out.append)
        assert out == [None] and svc.ports == [] and svc.token == ""
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any("admin API is off" in e.get("log_format", "") for e in seen)
    svc.stopService()


@pytest.mark.parametrize("argv", [
    ["track"], ["queue"], *[["queue", a] for a in ("list", "messages", "show", "retry", "suspend", "resume",
                                                   "remove", "export", "redirect")],
])
def test_every_command_has_help(argv: list[str], capsys: Any) -> None:
    from exmta.cli import make_parser

    with pytest.raises(SystemExit) as e:
        make_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: exmta {' '.join(argv)}") and len(out.splitlines()) > 5


def test_missing_arguments_are_usage_errors(capsys: Any) -> None:
    from exmta.cli import make_parser

    for argv in (["queue"], ["queue", "show"], ["queue", "retry"], ["track", "--format", "xml"]):
        with pytest.raises(SystemExit) as e:
            make_parser().parse_args(argv)
        assert e.value.code == 2, argv
    assert "usage:" in capsys.readouterr().err
