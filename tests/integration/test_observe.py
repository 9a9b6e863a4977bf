"""Black-box operations: metrics after real traffic, health checks, an alert, the status page in
headless Chromium, SIGHUP reload, and a graceful stop with a session in DATA and a delivery in flight."""
from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import procs
from support.exmta_proc import ExmtaProcess, clean_exit, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chromium_dom(url: str, tmp: Path) -> str:
    """The DOM of ``url`` after load, as headless Chromium (Debian's package) renders it."""
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: run scripts/install-test-deps.sh"
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
            "--virtual-time-budget=2000", "--dump-dom", url]
    done = subprocess.run(argv, capture_output=True, timeout=90, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def text_of(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


OBSERVE_EXTRA = """
[metrics]
listen = "tcp:{mport}:interface=127.0.0.1"
sample_interval = "0.5s"
status_page = true

[alerts]
interval = "0.5s"
repeat = "1h"
mail_postmaster = true

[alerts.rule.queue_not_empty]
kind = "queue_length"
threshold = 0
"""


@pytest.fixture
def slow_then_ok_sink() -> Any:
    """A sink that answers 451 for later@example.net until ``sink.release`` is set, then accepts."""
    release = threading.Event()

    def data_policy(got: Any) -> str | None:
        if "later@example.net" in got.rcpt_tos and not release.is_set():
            return "451 4.3.0 try again later"
        return None

    with SmtpSink(data_policy=data_policy) as sink:
        sink.release = release  # type: ignore[attr-defined]
        yield sink


def test_metrics_alert_and_status_page_after_real_traffic(
        tmp_path: Path, slow_then_ok_sink: SmtpSink, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    sink = slow_then_ok_sink
    mport = procs.free_port()
    toml = exmta_toml(smarthost=sink.next_hop, retry="1s", receive_extra='max_message_size = "4KiB"',
                      extra=OBSERVE_EXTRA)
    exmta = exmta_factory(toml=toml, subst={"mport": mport})
    procs.wait_for_port(mport, timeout=20)

    assert http_get(f"http://127.0.0.1:{mport}/healthz") == (200, "ok\n")
    # ready once every service has started (the listeners may answer a moment before)
    procs.wait_until(lambda: http_get(f"http://127.0.0.1:{mport}/readyz")[0] == 200, timeout=10,
                     what="/readyz 200", interval=0.05)
    status, body = http_get(f"http://127.0.0.1:{mport}/readyz")
    assert status == 200 and body.startswith("ready\nok   started"), body

    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.sendmail("alice@example.test", ["later@example.net"],
                   b"Subject: deferred then delivered\r\nMessage-ID: <dtd@example.test>\r\n\r\nhello\r\n")
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.sendmail("alice@example.test", ["bob@example.test"], b"Subject: local\r\n\r\nhi bob\r\n")
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.ehlo()
        assert c.mail("alice@example.test")[0] == 250  # no SIZE: the limit is hit during DATA
        assert c.rcpt("carol@example.test")[0] == 250
        assert c.data(b"Subject: big\r\n\r\n" + b"x" * 8000 + b"\r\n")[0] == 552

    # while the message waits for the sink: the queue gauges, the alert and the status page
    def deferred_seen() -> bool:
        s = scrape(mport)
        return metric(s, "exmta_messages_deferred_total", connector="relay", reason="451 4.3.0") >= 1 and \
            metric(s, "exmta_queue_messages", queue="deferred") >= 1
    procs.wait_until(deferred_seen, timeout=10, what="a deferral in /metrics", interval=0.1)
    s = scrape(mport)
    # the unauthenticated listener: per send connector, no next hops (recipient domains; issue 11)
    assert not any(k[0] == "exmta_queue_nexthop_messages" for k in s)
    assert metric(s, "exmta_queue_connector_messages", connector="relay") >= 1
    assert metric(s, "exmta_queue_oldest_message_age_seconds") >= 0

    # the page shows the last queue sample (every 0.5 s), and the message moves between deferred/ and
    # active/ every second: a sample can miss it, so load the page until one shows it (bounded). The
    # alert is evaluated on each sample, so a page with the next hop also has the alert firing.
    def page_shows_both(html: str) -> bool:
        return re.search(r"relay/\S+</td><td>1<", html) is not None and 'class="firing alert"' in html
    for _ in range(5):
        procs.wait_until(lambda: page_shows_both(http_get(f"http://127.0.0.1:{mport}/status")[1]), timeout=10,
                         what="the next hop and the firing alert on the status page", interval=0.1)
        dom = chromium_dom(f"http://127.0.0.1:{mport}/status", tmp_path)
        text = text_of(dom)
        if re.search(r"relay/\S+ 1 ", text) and 'class="firing alert"' in dom:
            break
    assert "exmta on mx.example.test" in text
    assert re.search(r"relay/\S+ 1 ", text), text[:3000]      # next hop with its count
    assert "451 4.3.0 try again later" in text                 # its last error
    assert "queue_not_empty" in text and 'class="firing alert"' in dom
    assert dom.count("<svg") == 3 and "Messages per minute" in text

    # delivered once the sink accepts; the alert clears when the queue is empty
    time.sleep(1.0)  # a second deferral at least: the latency below includes the wait
    sink.release.set()  # type: ignore[attr-defined]
    (got,) = sink.wait_for(1, timeout=30)
    assert got.rcpt_tos == ["later@example.net"]

    def settled() -> bool:
        s = scrape(mport)
        return metric(s, "exmta_messages_delivered_total", connector="relay") == 1 and \
            metric(s, "exmta_queue_messages", queue="deferred") == 0 and \
            "No active alerts" in http_get(f"http://127.0.0.1:{mport}/status")[1]
    procs.wait_until(settled, timeout=20, what="delivery and a cleared alert", interval=0.2)

    s = scrape(mport)
    assert metric(s, "exmta_smtp_connections_total", connector="default") >= 3
    assert metric(s, "exmta_messages_received_total", connector="default", source="SMTP") == 2
    assert metric(s, "exmta_messages_delivered_total", connector="local") >= 1  # bob (+ the alert mails)
    assert metric(s, "exmta_messages_rejected_total", connector="default", reason="552 5.3.4") == 1
    assert metric(s, "exmta_delivery_latency_seconds_count", connector="relay") == 1
    assert metric(s, "exmta_delivery_latency_seconds_sum", connector="relay") >= 1.0  # waited for the sink
    assert metric(s, "exmta_tls_sessions_total", direction="outbound", connector="relay", version="none") == 1
    assert metric(s, "exmta_auth_failures_total", connector="default") == 0

    # the alert was mailed to the postmaster through the queue: fired and cleared
    def alert_mails() -> list[bytes]:
        return exmta.maildir_messages("postmaster@example.test")
    procs.wait_until(lambda: len(alert_mails()) >= 2, timeout=20, what="two alert mails to the postmaster")
    subjects = sorted(re.search(rb"Subject: (.*)", m).group(1).decode() for m in alert_mails())
    assert any("[FIRING] queue_not_empty" in x for x in subjects), subjects
    assert any("[CLEARED] queue_not_empty" in x for x in subjects), subjects

    # the search box over the tracking log, in the browser: the message's history
    dom = chromium_dom(f"http://127.0.0.1:{mport}/status?q=later%40example.net", tmp_path)
    events = re.findall(r'<tr class="event"><td>[^<]*</td><td>([A-Z]+)</td>', dom)
    assert {"RECEIVE", "DEFER", "SEND"} <= set(events), events
    dom = chromium_dom(f"http://127.0.0.1:{mport}/status?q=colour%3Ared", tmp_path)
    assert "Cannot search: unknown field" in text_of(dom)
    assert exmta.error_lines() == []


def test_readyz_fails_below_the_disk_floor(exmta_factory: Callable[..., ExmtaProcess]) -> None:
    mport = procs.free_port()
    extra = f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\nmin_free_disk = "1000000TiB"\n'
    exmta_factory(toml=exmta_toml(extra=extra))
    procs.wait_for_port(mport, timeout=20)
    status, body = http_get(f"http://127.0.0.1:{mport}/readyz")
    assert status == 503 and "FAIL queue disk" in body
    status, body = http_get(f"http://127.0.0.1:{mport}/readyz?format=json")
    assert json.loads(body)["ready"] is False
    assert http_get(f"http://127.0.0.1:{mport}/healthz")[0] == 200


def _send_raw(port: int, lines: list[bytes]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    procs.read_smtp_reply(s)
    for line in lines:
        s.sendall(line)
        procs.read_smtp_reply(s)
    return s


def test_sighup_reload_applies_valid_config_and_keeps_running_on_a_bad_one(
        tmp_path: Path, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    exmta = exmta_factory(toml=exmta_toml(local_domains=("example.test",), relay_networks=("127.0.0.0/8",)))
    assert exmta.config_path is not None
    good = exmta.config_path.read_text()
    # SMTP answers before the last services start; SIGHUP before the handler is installed would end twistd
    procs.wait_until(lambda: "SIGHUP reloads" in exmta.log_text(), timeout=10, what="the SIGHUP handler")

    # a broken file: refused, the old configuration stays, the log says why
    exmta.config_path.write_text(good.replace('[queue]\n', '[queue]\nmax_active = -3\n'))
    exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    procs.wait_until(lambda: "refused, the running configuration stays" in exmta.log_text(), timeout=10,
                     what="the refusal in the log")
    assert "queue.max_active" in exmta.log_text()
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.sendmail("a@example.test", ["new@example.org"], b"Subject: still relays\r\n\r\nx\r\n")

    # a valid file: example.org becomes a local domain (router and policy), relaying from loopback
    # stops (policy), a listen change is logged as needing a restart
    changed = (good.replace('"example.test" = "authoritative"',
                            '"example.test" = "authoritative"\n"example.org" = "authoritative"')
                   .replace('relay_networks = ["127.0.0.0/8"]', "relay_networks = []")
                   .replace('domains = ["example.test"]', 'domains = ["example.test", "example.org"]')
                   .replace('retry_schedule = ["1s"]', 'retry_schedule = ["2s"]')
                   .replace(f'listen = ["tcp:{exmta.port}:interface=127.0.0.1"]',
                            f'listen = ["tcp:{exmta.port}:interface=127.0.0.1", '
                            f'"tcp:{procs.free_port()}:interface=127.0.0.1"]'))
    assert changed.count("example.org") == 2 and "relay_networks = []" in changed
    exmta.config_path.write_text(changed)
    exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    procs.wait_until(lambda: "reloaded (" in exmta.log_text(), timeout=10, what="the reload in the log")
    log = exmta.log_text()
    assert "routes: 1 route(s) applied" in log and "queue settings applied" in log
    assert "needs a restart to take effect" in log and "receive.default.listen" in log
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.sendmail("a@example.test", ["dora@example.org"], b"Subject: now local\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("a@example.test", ["x@example.net"], b"Subject: no relay\r\n\r\nx\r\n")
    procs.wait_until(lambda: len(exmta.maildir_messages("dora@example.org")) == 1, timeout=20,
                     what="delivery to the new local domain")
    assert exmta.running()
    assert exmta.error_lines() == []


def test_graceful_stop_with_a_session_in_data_and_a_delivery_in_flight(
        tmp_path: Path, free_tcp_port: int) -> None:
    """SIGTERM: listening stops at once, the session in DATA may finish (250), the delivery in
    flight finishes, nothing is delivered twice and the queue is empty after a restart."""
    release = threading.Event()
    entered = threading.Event()

    def slow(got: Any) -> str | None:
        if "slow@example.net" in got.rcpt_tos:
            entered.set()
            release.wait(20)
        return None

    data = tmp_path / "data"
    mport = procs.free_port()
    toml = exmta_toml(smarthost=f"[127.0.0.1]:{free_tcp_port}", retry="1s",
                      extra=f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\n')
    with SmtpSink(port=free_tcp_port, data_policy=slow) as sink:
        first = ExmtaProcess(tmp_path / "run1", toml=toml, data_dir=data).start()
        try:
            with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as c:
                c.sendmail("a@example.test", ["slow@example.net"], b"Subject: in flight\r\n\r\nslow\r\n")
            assert entered.wait(15), "the delivery did not reach the sink"
            # a second client is in the middle of DATA
            s = _send_raw(first.port, [b"EHLO client.test\r\n", b"MAIL FROM:<a@example.test>\r\n",
                                       b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"])
            s.sendall(b"Subject: in data\r\n\r\nfirst half\r\n")
            first.process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            procs.wait_until(lambda: not procs.port_in_use(first.port), timeout=10, what="listener closed")
            s.sendall(b"second half\r\n.\r\n")
            code, lines = procs.read_smtp_reply(s)
            assert code == 250, lines
            s.sendall(b"QUIT\r\n")
            s.close()
            time.sleep(0.5)
            assert first.running()  # still finishing the delivery in flight
            # the load balancer is told at once (the health listener stops last)
            status, body = http_get(f"http://127.0.0.1:{mport}/readyz")
            assert status == 503 and "FAIL not stopping: stopping" in body, body
            release.set()
            procs.wait_until(lambda: not first.running(), timeout=40, what="exmta exits")
            assert clean_exit(first.process.proc.returncode)  # type: ignore[union-attr]
        finally:
            release.set()
            first.stop()
        assert [m.rcpt_tos for m in sink.messages] == [["slow@example.net"]]
        log = first.log_text()
        assert "Traceback" not in log

        second = ExmtaProcess(tmp_path / "run2", toml=toml, data_dir=data).start()
        try:
            procs.wait_until(lambda: len(second.maildir_messages("bob@example.test")) == 1, timeout=20,
                             what="the message accepted during the stop is delivered after the restart")
            time.sleep(2)
            assert [m.rcpt_tos for m in sink.messages] == [["slow@example.net"]]  # not delivered twice
        finally:
            second.stop()
        queue = data / "queue"
        left = [p for d in ("incoming", "active", "deferred") for p in (queue / d).glob("*.json")]
        assert left == []


def test_session_past_the_grace_gets_421(tmp_path: Path, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    exmta = exmta_factory(toml=exmta_toml())
    s = _send_raw(exmta.port, [b"EHLO client.test\r\n", b"MAIL FROM:<a@example.test>\r\n",
                               b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"])
    s.sendall(b"Subject: never finished\r\n\r\n")
    exmta.process.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    code, lines = procs.read_smtp_reply(s, timeout=30)
    assert code == 421 and lines[0].startswith("4.3.2 "), (code, lines)
    # the grace was honoured: had the session been closed at once, the drain would have cancelled
    # the grace timer and this line would not exist (no wall-clock window: the CPUs may be busy)
    assert "shutdown grace over: closing 1 session(s)" in exmta.log_text()
    s.close()
    procs.wait_until(lambda: not exmta.running(), timeout=30, what="exmta exits")
    assert exmta.maildir_messages("bob@example.test") == []


def test_receive_worker_sessions_and_messages_are_counted_in_the_main_process(
        smtp_sink: SmtpSink, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    """With receive_workers = 1 every connection is accepted by the worker process; its events
    reach the main process's metrics over the worker's stdout (exmta.observe.worker_metrics)."""
    mport = procs.free_port()
    extra = f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\n'
    exmta = exmta_factory(toml=exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=1, extra=extra))
    procs.wait_until(lambda: "receive worker ready" in exmta.log_text(), timeout=20, what="the worker")
    for i in range(3):
        with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
            c.sendmail("a@example.test", [f"w{i}@example.net"], b"Subject: via worker\r\n\r\nx\r\n")
    smtp_sink.wait_for(3, timeout=30)

    def counted() -> bool:
        s = scrape(mport)
        return metric(s, "exmta_messages_delivered_total", connector="relay") == 3
    procs.wait_until(counted, timeout=20, what="three deliveries in /metrics", interval=0.1)
    s = scrape(mport)
    assert metric(s, "exmta_messages_received_total", connector="default", source="SMTP") == 3
    assert metric(s, "exmta_smtp_connections_total", connector="default") >= 3  # + the start-up probe
    assert "worker[0]" in exmta.log_text() and "receive worker ready" in exmta.log_text()
    assert exmta.error_lines() == []


def test_status_page_and_metrics_behind_the_admin_api(
        tmp_path: Path, smtp_sink: SmtpSink, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    """The admin API serves the page, /metrics and the health checks only with its token; in Chromium
    with the token as the Basic password the page shows the queue and the tracking search."""
    aport = procs.free_port()
    extra = f'[admin]\nlisten = ["tcp:{aport}:interface=127.0.0.1"]\n[metrics]\nsample_interval = "0.5s"\n'
    exmta = exmta_factory(toml=exmta_toml(smarthost=smtp_sink.next_hop, extra=extra))
    token_file = exmta.data_dir / "admin.token"
    procs.wait_until(lambda: token_file.exists() and procs.port_in_use(aport), timeout=20, what="the admin API")
    token = token_file.read_text().strip()
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c.sendmail("alice@example.test", ["zed@example.net"], b"Subject: via admin\r\n\r\nx\r\n")
    smtp_sink.wait_for(1, timeout=30)

    for path in ("status", "metrics", "readyz"):
        status, body = http_get(f"http://127.0.0.1:{aport}/{path}")
        assert status == 401 and "token" in body, (path, status, body)
    req = urllib.request.Request(f"http://127.0.0.1:{aport}/metrics", headers={"Authorization": f"Bearer {token}"})
    with _OPENER.open(req, timeout=10) as r:
        text = r.read().decode()
    assert 'exmta_messages_received_total{connector="default",source="SMTP"} 1.0' in text

    dom = chromium_dom(f"http://admin:{token}@127.0.0.1:{aport}/status?q=zed%40example.net", tmp_path)
    text = text_of(dom)
    assert "exmta on mx.example.test" in text and "Queue Messages incoming" in text
    events = re.findall(r'<tr class="event"><td>[^<]*</td><td>([A-Z]+)</td>', dom)
    assert {"RECEIVE", "SEND"} <= set(events), events
    assert token not in dom


def test_inbound_tls_counted_and_certificate_expiry_alert(
        tmp_path: Path, exmta_factory: Callable[..., ExmtaProcess]) -> None:
    """STARTTLS sessions are counted by TLS version; a cert_expiry rule with no file list watches the
    receive connector's own certificate (threshold far away so that it fires now)."""
    import ssl

    from support.tlscerts import TestPKI

    pki = TestPKI(tmp_path / "pki")
    files = pki.server("mx.example.test")
    mport = procs.free_port()
    receive_extra = f'\n[receive.default.tls]\ncert = "{files.cert}"\nkey = "{files.key}"\n'
    extra = (f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\nstatus_page = true\n'
             '[alerts]\ninterval = "0.5s"\nmail_postmaster = false\n'
             '[alerts.rule.certificate]\nkind = "cert_expiry"\nthreshold = 1000000\n')
    exmta = exmta_factory(toml=exmta_toml(receive_extra=receive_extra, extra=extra))
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    with smtplib.SMTP("127.0.0.1", exmta.port, timeout=10) as c:
        c._host = "mx.example.test"  # the name to verify
        c.starttls(context=ctx)
        c.sendmail("a@example.test", ["bob@example.test"], b"Subject: over TLS\r\n\r\nx\r\n")
        version = c.sock.version()  # type: ignore[union-attr]

    procs.wait_until(lambda: "alert certificate firing" in exmta.log_text(), timeout=10, what="the alert")
    s = scrape(mport)
    assert metric(s, "exmta_tls_sessions_total", direction="inbound", connector="default", version=version) == 1
    status, page = http_get(f"http://127.0.0.1:{mport}/status")
    assert "certificate" in page and str(files.cert) in page and 'class="firing alert"' in page
