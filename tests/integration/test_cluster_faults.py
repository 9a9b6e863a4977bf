"""Several exmta nodes sharing one PostgreSQL queue: faults that must lose nothing acknowledged.

Each test prints acknowledged / delivered / lost / duplicates (run with ``-s``):

* three nodes behind HAProxy (etc/cluster/ as written) under load, the next hop
  tempfailing, one node SIGKILLed with its whole process tree and never
  restarted: the survivors deliver its mail;
* PostgreSQL restarted under load: sessions get 4xx while it is away,
  nothing acknowledged is lost, the nodes reconnect on their own;
* a node cut off from PostgreSQL while it holds leases: it stops
  acknowledging, the others take over, its late results are fenced off.
"""
from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support.exmta_proc import ExmtaProcess, exmta_toml
from support.procs import descendants, pid_alive, wait_until
from support.sinks import SmtpSink

BODY = ("y" * 76 + "\r\n") * 20


class Gate:
    """The next hop's RCPT answer: 451 while closed (mail stays acknowledged and undelivered)."""

    def __init__(self) -> None:
        self.closed = True

    def __call__(self, address: str) -> str | None:
        return "451 4.3.2 try again later" if self.closed else None


class Load:
    """Clients sending numbered messages round-robin to several nodes; records each 250 and each 4xx."""

    def __init__(self, ports: list[int], clients: int, per_client: int, prefix: str = "m",
                 rcpt: str = "x@dest.test") -> None:
        self.ports = ports
        self.rcpt = rcpt
        self.per_client = per_client
        self.prefix = prefix
        self.acked: list[str] = []
        self.tempfailed = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]

    def _client(self, c: int) -> None:
        for n in range(self.per_client):
            if self.stop.is_set():
                return
            tag = f"{self.prefix}-{c}-{n}"
            port = self.ports[(c + n) % len(self.ports)]
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                    client.sendmail("app@lan.test", [self.rcpt],
                                    f"Subject: {tag}\r\nMessage-ID: <{tag}@lan.test>\r\n\r\n{BODY}".encode())
            except smtplib.SMTPResponseException as e:
                if 400 <= e.smtp_code < 500:
                    with self.lock:
                        self.tempfailed += 1
                continue
            except (OSError, smtplib.SMTPException):
                continue  # that node died under us: not acknowledged
            with self.lock:
                self.acked.append(tag)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)


def node(tmp_path: Path, name: str, dsn: str, sink: SmtpSink, lease: str = "5s") -> ExmtaProcess:
    extra = (f'store = "postgres"\n\n[postgres]\ndsn = "{dsn}"\nnode = "{name}"\nlease = "{lease}"\n'
             'poll_interval = "0.5s"\n\n[admin]\nlisten = ["unix:{workdir}/admin.sock"]\n')
    toml = exmta_toml(smarthost=sink.next_hop, retry="1s", extra=extra, hostname=f"{name}.example.test")
    return ExmtaProcess(tmp_path / name, toml, start_timeout=60).start()


def kill_tree(pid: int) -> None:
    """SIGKILL a node and every process under it (its receive workers)."""
    children = [p for p, _ in descendants(pid)]
    for p in [pid, *children]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in [pid, *children]:
        wait_until(lambda: not pid_alive(p), timeout=15, what=f"process {p} to die")


def settle(sink: SmtpSink, acked: set[str], timeout: float = 120.0) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {r.message()["Subject"] for r in list(sink.messages)}
        if acked <= seen:
            break
        time.sleep(0.2)
    return Counter(r.message()["Subject"] for r in list(sink.messages))


def tracked_receives(dsn: str, node_name: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM exmta_tracking WHERE node = %s AND event_id = 'RECEIVE'",
                            (node_name,)).fetchone()[0]


def queue_rows(dsn: str) -> dict[str, int]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, count(*) FROM exmta_message GROUP BY state").fetchall()
    return {state: n for state, n in rows}


REPO = Path(__file__).resolve().parents[2]


class ProxiedNode(ExmtaProcess):
    """A node from etc/cluster/node.toml as written, but for its addresses: behind HAProxy, so it is
    ready when its /readyz says so (its SMTP port speaks only after a PROXY header)."""

    def __init__(self, tmp_path: Path, name: str, dsn: str, next_hop: str) -> None:
        from support.procs import free_port

        self.metrics_port = free_port()
        port = free_port()
        text = (REPO / "etc" / "cluster" / "node.toml").read_text()
        for old, new in (('hostname = "mx1.example.com"', f'hostname = "{name}.example.com"'),
                         ("haproxy:tcp:2525:interface=10.0.0.11", f"haproxy:tcp:{port}:interface=127.0.0.1"),
                         ('trusted_proxies = ["10.0.0.5/32"]', 'trusted_proxies = ["127.0.0.1/32"]'),
                         ('smarthosts = ["[exchange.example.com]:25"]', f'smarthosts = ["{next_hop}"]'),
                         ('dsn = "host=db.example.com dbname=exmta user=exmta sslmode=verify-full"', f'dsn = "{dsn}"'),
                         ('node = "mx1"', f'node = "{name}"'),
                         ('lease = "60s"', 'lease = "5s"\npoll_interval = "0.5s"'),
                         ('store = "postgres"', 'store = "postgres"\nretry_schedule = ["1s"]'),
                         ("tcp:9125:interface=10.0.0.11", f"tcp:{self.metrics_port}:interface=127.0.0.1")):
            assert old in text, old
            text = text.replace(old, new)
        text = text.replace("[server]\n", '[server]\ndata_dir = "{data_dir}"\n', 1)
        text += '\n[admin]\nlisten = ["unix:{workdir}/admin.sock"]\n'
        super().__init__(tmp_path / name, text, port=port, start_timeout=60)

    def start(self) -> "ProxiedNode":
        import urllib.request

        from support.procs import ManagedProcess

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "exmta.toml"
        self.config_path.write_text(self.render_toml())
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        self.process = ManagedProcess(self.argv(), log_path=self.log_path, env=env, cwd=self.workdir,
                                      stop_signal=signal.SIGTERM, stop_timeout=self.stop_timeout,
                                      name=f"exmta:{self.port}").start()

        wait_until(self.ready, timeout=self.start_timeout, what=f"{self.process.name} /readyz")
        return self

    def ready(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            e.close()
            return False
        except OSError:
            return False


class HAProxy:
    """etc/cluster/haproxy.cfg as written, but for the frontend port and the node addresses."""

    def __init__(self, tmp_path: Path, nodes: list[ProxiedNode]) -> None:
        from support.procs import ManagedProcess, free_port

        self.port = free_port()
        text = (REPO / "etc" / "cluster" / "haproxy.cfg").read_text()
        text = text.replace("    bind :25\n", f"    bind 127.0.0.1:{self.port}\n")
        lines = [line for line in text.splitlines() if not line.strip().startswith("server mx")]
        lines += [f"    server {n.workdir.name} 127.0.0.1:{n.port} check port {n.metrics_port}" for n in nodes]
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.process = ManagedProcess(["haproxy", "-db", "-f", str(cfg)], log_path=tmp_path / "haproxy.log",
                                      name="haproxy").start()
        self.process.wait_port(self.port)

    def stop(self) -> None:
        self.process.stop()


def test_a_node_killed_for_good_behind_haproxy_loses_nothing(tmp_path: Path, pg_dsn: str,
                                                             smtp_sink_factory: Any) -> None:
    gate = Gate()
    sink = smtp_sink_factory(rcpt_policy=gate)
    nodes = [ProxiedNode(tmp_path, f"mx{x}", pg_dsn, sink.next_hop).start() for x in "123"]
    lb = HAProxy(tmp_path, nodes)
    try:
        load = Load([lb.port], clients=6, per_client=60, rcpt="x@example.com")
        load.start()
        # every node holds acknowledged, undelivered mail (the next hop tempfails)
        wait_until(lambda: len(load.acked) >= 40 and all(n.log_text().count("queued") for n in nodes),
                   timeout=120, what="40 acknowledged messages spread over the nodes")
        # (a node's tracking events reach the shared table within a second: wait for some of mx1's)
        wait_until(lambda: tracked_receives(pg_dsn, "mx1") > 0, timeout=30, what="mx1's events in the table")
        kill_tree(nodes[0].pid)
        killed_at = len(load.acked)
        load.join()
        gate.closed = False  # the next hop recovers; mx1 never comes back
        acked = set(load.acked)
        counts = settle(sink, acked)
        lost = acked - set(counts)
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        print(f"\nthree nodes behind HAProxy, mx1 killed for good after {killed_at} acknowledged: acknowledged "
              f"{len(acked)}, refused or cut {6 * 60 - len(acked)}, delivered {len(counts)} distinct, "
              f"duplicates {duplicates}, lost {len(lost)}")
        assert not lost, f"acknowledged but never delivered: {sorted(lost)[:10]}"
        wait_until(lambda: queue_rows(pg_dsn) == {}, timeout=60, what="an empty queue")
        assert all(n.running() for n in nodes[1:])
        # `exmta track` on a survivor finds a message that mx1 received and another node delivered
        import json as json_mod
        import psycopg

        def taken_over() -> list[str]:
            with psycopg.connect(pg_dsn) as conn:
                return [r[0] for r in conn.execute(
                    "SELECT r.queue_id FROM exmta_tracking r JOIN exmta_tracking d ON d.queue_id = r.queue_id"
                    " WHERE r.event_id = 'RECEIVE' AND r.node = 'mx1' AND d.event_id = 'SEND'"
                    " AND d.node <> 'mx1'").fetchall()]
        try:
            wait_until(lambda: taken_over(), timeout=30, what="tracking events of a taken-over message")
        except TimeoutError:
            with psycopg.connect(pg_dsn) as conn:
                summary = conn.execute("SELECT node, event_id, count(*) FROM exmta_tracking GROUP BY 1, 2"
                                       " ORDER BY 1, 2").fetchall()
            raise AssertionError(f"tracking table: {summary}") from None
        qid = taken_over()[0]
        out = subprocess.run([str(REPO / ".venv" / "bin" / "exmta"), "track", "-c", str(nodes[1].config_path),
                              "--queue-id", qid, "--format", "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        events = [(e["event_id"], e["node"]) for e in map(json_mod.loads, out.stdout.splitlines())]  # JSON lines
        assert ("RECEIVE", "mx1") in events and any(ev == "SEND" and nd != "mx1" for ev, nd in events), events
        # drain takes mx2 out of the load balancer (its /readyz fails); undrain brings it back
        exmta = str(REPO / ".venv" / "bin" / "exmta")
        conf = str(nodes[1].config_path)
        assert subprocess.run([exmta, "cluster", "drain", "mx2", "-c", conf], timeout=60).returncode == 0
        wait_until(lambda: nodes[1].ready() is False, timeout=30, what="mx2's /readyz to fail")
        def status() -> str:
            return subprocess.run([exmta, "cluster", "status", "-c", conf], capture_output=True, text=True,
                                  timeout=60).stdout
        # mx1 shows as down once its last heartbeat is older than max(15 s, lease / 2)
        wait_until(lambda: re.search(r"^mx1 +down ", status(), re.M), timeout=60, what="mx1 shown down")
        text = status()
        assert re.search(r"^mx2 +draining ", text, re.M) and re.search(r"^mx3 +up ", text, re.M), text
        assert subprocess.run([exmta, "cluster", "undrain", "mx2", "-c", conf], timeout=60).returncode == 0
        wait_until(lambda: nodes[1].ready() is True, timeout=30, what="mx2's /readyz to pass again")
    finally:
        lb.stop()
        for n in nodes[1:]:
            n.stop()
        nodes[0].stop()


def test_postgresql_restarted_under_load(tmp_path: Path, pg_cluster: Any, smtp_sink_factory: Any) -> None:
    from exmta.queue.postgres import migrate_dsn

    dsn = pg_cluster.create_database()
    migrate_dsn(dsn)
    sink = smtp_sink_factory()
    nodes = [node(tmp_path, f"node-{x}", dsn, sink) for x in "ab"]
    try:
        load = Load([n.port for n in nodes], clients=4, per_client=40)
        load.start()
        wait_until(lambda: len(load.acked) >= 30, timeout=120, what="30 acknowledged messages")
        pg_cluster.stop()
        time.sleep(1.0)  # the database stays away for a moment while clients keep sending
        pg_cluster.start()
        load.join()
        acked = set(load.acked)
        counts = settle(sink, acked)
        lost = acked - set(counts)
        print(f"\nPostgreSQL restarted under load: acknowledged {len(acked)}, 4xx while away {load.tempfailed}, "
              f"delivered {len(counts)} distinct, duplicates {sum(n - 1 for n in counts.values() if n > 1)}, "
              f"lost {len(lost)}")
        assert not lost, f"acknowledged but never delivered: {sorted(lost)[:10]}"
        # the nodes reconnected on their own: new mail goes through both
        after = Load([n.port for n in nodes], clients=2, per_client=3, prefix="after")
        after.start()
        after.join()
        assert len(after.acked) == 6
        settle(sink, set(after.acked), timeout=60)
        for n in nodes:
            assert not [line for line in n.error_lines() if "Traceback" in line]
    finally:
        for n in nodes:
            n.stop()


def test_a_node_cut_off_from_postgresql_stops_acknowledging_and_cannot_overwrite(
        tmp_path: Path, pg_cluster: Any, smtp_sink_factory: Any) -> None:
    """node-a reaches PostgreSQL through a proxy that the test cuts while node-a holds leases (its next
    hop stalls); node-b takes the mail over and delivers it; node-a, back, is fenced off."""
    from exmta.queue.postgres import migrate_dsn
    from support.tcpproxy import CuttableProxy, StallingServer

    dsn = pg_cluster.create_database()
    migrate_dsn(dsn)
    sink = smtp_sink_factory()
    proxy = CuttableProxy(f"{pg_cluster.socket_dir}/.s.PGSQL.{pg_cluster.port}")
    dsn_via_proxy = dsn.replace(f"host={pg_cluster.socket_dir} port={pg_cluster.port}",
                                f"host=127.0.0.1 port={proxy.port}")
    with StallingServer() as stall:
        a = node(tmp_path, "node-a", dsn_via_proxy, stall)  # type: ignore[arg-type]
        b: ExmtaProcess | None = None
        try:
            load = Load([a.port], clients=3, per_client=5)
            load.start()
            load.join()
            acked = set(load.acked)
            assert len(acked) == 15
            wait_until(lambda: queue_rows(dsn).get("active", 0) >= 1, timeout=30, what="node-a to claim mail")
            proxy.cut()
            # cut off: node-a stops acknowledging
            refused = Load([a.port], clients=1, per_client=2, prefix="cut")
            refused.start()
            refused.join()
            assert refused.acked == [] and refused.tempfailed == 2
            b = node(tmp_path, "node-b", dsn, sink)
            counts = settle(sink, acked)
            lost = acked - set(counts)
            assert not lost, f"acknowledged but never delivered: {sorted(lost)[:10]}"
            assert "took over" in b.log_text()
            wait_until(lambda: queue_rows(dsn) == {}, timeout=60, what="an empty queue")
            # node-a comes back; its stalled deliveries end; its late results are fenced off
            proxy.restore()
            stall.release()
            wait_until(lambda: "lease lost to another node" in a.log_text(), timeout=60,
                       what="node-a to report its results fenced off")
            assert queue_rows(dsn) == {}
            dup = sum(n - 1 for n in Counter(r.message()["Subject"] for r in list(sink.messages)).values() if n > 1)
            print(f"\nnode-a cut off holding leases: acknowledged {len(acked)}, refused while cut off "
                  f"{refused.tempfailed}, delivered by node-b {len(counts)} distinct, duplicates {dup}, "
                  f"lost {len(lost)}")
        finally:
            if b is not None:
                b.stop()
            a.stop()
            proxy.close()


def test_postgresql_out_of_disk_is_452_not_250_then_lose(tmp_path: Path, pg_cluster: Any,
                                                          smtp_sink_factory: Any) -> None:
    """The database's tables live on a small tmpfs (a tablespace); the next hop tempfails so mail piles up.
    When the tablespace is full, end of data gets 452 4.3.1; every 250 was stored; after the file
    system grows again, everything acknowledged is delivered."""
    import pwd

    import psycopg

    from exmta.queue.postgres import migrate_dsn

    mnt = Path(pg_cluster.dir) / ("small-tablespace-" + os.urandom(4).hex())  # reachable by the postgres user
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        pw = pwd.getpwnam("postgres")
        os.chown(mnt, pw.pw_uid, pw.pw_gid)
        name = "t_small_" + os.urandom(4).hex()
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE {name} LOCATION '{mnt}'")
            conn.execute(f"CREATE DATABASE {name} TABLESPACE {name}")
        dsn = pg_cluster.dsn(name)
        migrate_dsn(dsn)
        gate = Gate()
        sink = smtp_sink_factory(rcpt_policy=gate)
        n = node(tmp_path, "node-a", dsn, sink)
        try:
            import base64
            acked: list[str] = []
            refused: list[tuple[int, bytes]] = []
            for i in range(120):  # 100 KiB each: the 6 MiB tablespace fills well before the end
                tag = f"full-{i}"
                try:
                    with smtplib.SMTP("127.0.0.1", n.port, timeout=30) as client:
                        client.sendmail("app@lan.test", ["x@dest.test"],
                                        f"Subject: {tag}\r\n\r\n".encode()  # random: PostgreSQL cannot compress it
                                        + base64.encodebytes(os.urandom(75_000)).replace(b"\n", b"\r\n"))
                    acked.append(tag)
                except smtplib.SMTPResponseException as e:
                    refused.append((e.smtp_code, e.smtp_error))
                    if len(refused) >= 3:
                        break
            assert refused, "the tablespace never filled"
            assert all(code == 452 and b"4.3.1" in text for code, text in refused), refused
            subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True, timeout=10)
            gate.closed = False
            counts = settle(sink, set(acked))
            lost = set(acked) - set(counts)
            print(f"\nPostgreSQL out of disk: acknowledged {len(acked)}, refused {len(refused)} "
                  f"({refused[0][0]} {refused[0][1][:40]!r}), delivered {len(counts)} distinct, lost {len(lost)}")
            assert not lost, f"acknowledged but never delivered: {sorted(lost)[:10]}"
        finally:
            n.stop()
            with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                conn.execute(f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)
