"""Cross-checks against independent implementations from Debian.

* SPF: every (sender, client address) of the record matrix is evaluated by
  exmta (pyspf through our resolver) and by ``spfquery`` (Mail::SPF, Perl,
  Net::DNS pointed at the same Knot with RES_NAMESERVERS/RES_OPTIONS).
* DKIM: messages signed by exmta are verified by OpenDKIM's
  ``opendkim-testmsg``. It only resolves through /etc/resolv.conf on port 53,
  so it runs in a private network and mount namespace (``unshare``) where
  /etc/resolv.conf says 127.0.0.1 and a second Knot serves the zones on :53
  (COMPONENTS.md section 3).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exmta.dns import AuthDNS
from exmta.filters.spf import check_spf
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import sign_message
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration

SPFQUERY = shutil.which("spfquery") or "/usr/bin/spfquery"
TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"

# the SPF matrix of test_auth_knot.py plus HELO-only and null-sender cases
MATRIX = [
    ("alice@plain.spf.test", "192.0.2.10"), ("alice@plain.spf.test", "198.51.100.7"),
    ("alice@inc.spf.test", "192.0.2.10"), ("alice@inc.spf.test", "198.51.100.7"),
    ("alice@redir.spf.test", "192.0.2.10"), ("alice@redir.spf.test", "198.51.100.7"),
    ("alice@macro.spf.test", "192.0.2.10"), ("bob@macro.spf.test", "192.0.2.10"),
    ("alice-ext@macro.spf.test", "192.0.2.10"), ("ext-alice@macro.spf.test", "192.0.2.10"),
    ("alice@mxm.spf.test", "192.0.2.20"), ("alice@mxm.spf.test", "192.0.2.21"),
    ("alice@amech.spf.test", "192.0.2.30"), ("alice@ip6m.spf.test", "2001:db8::5"),
    ("alice@ip6m.spf.test", "2001:db9::5"), ("alice@soft.spf.test", "192.0.2.10"),
    ("alice@neutral.spf.test", "192.0.2.10"), ("alice@exp.spf.test", "192.0.2.10"),
    ("alice@toomany.spf.test", "192.0.2.10"), ("alice@void.spf.test", "192.0.2.10"),
    ("alice@tempinc.spf.test", "192.0.2.10"), ("alice@syntax.spf.test", "192.0.2.10"),
    ("alice@badmech.spf.test", "192.0.2.10"), ("alice@two.spf.test", "192.0.2.10"),
    ("alice@nospf.spf.test", "192.0.2.10"), ("alice@nxdomain.spf.test", "192.0.2.10"),
    ("alice@example.test", "192.0.2.77"), ("alice@other.test", "192.0.2.77"),
]


def spfquery(knot_server: knot.KnotServer, cwd: Path, sender: str, ip: str, helo: str) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
           "RES_NAMESERVERS": knot_server.host,
           # Net::DNS waits 5 s, doubling, over 4 tries: one lost datagram on a busy machine costs
           # more than a minute; 1 s doubling over 5 tries (31 s in all) keeps retrying sooner
           "RES_OPTIONS": f"port:{knot_server.port} retrans:1 retry:5"}
    out = subprocess.run([SPFQUERY, "--scope", "mfrom", "--id", sender, "--ip", ip, "--helo-id", helo],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split("\n", 1)[0].strip()


def test_spf_results_agree_with_spfquery(knot_server: knot.KnotServer, tmp_path: Path) -> None:
    dns = AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))
    rows = []
    for sender, ip in MATRIX:
        ours = check_spf(dns, ip, sender, "client.example.test").result
        theirs = spfquery(knot_server, tmp_path, sender, ip, "client.example.test")
        rows.append((sender, ip, ours, theirs))
    table = "\n".join(f"{s:28} {i:14} exmta={o:10} spfquery={t}" for s, i, o, t in rows)
    print(table)
    assert all(t for _, _, _, t in rows), table  # spfquery answered every case
    assert [r for r in rows if r[2] != r[3]] == [], table


NETNS_SCRIPT = """\
set -eu
ip link set lo up
echo "nameserver 127.0.0.1" > {d}/resolv.conf
mount --bind {d}/resolv.conf /etc/resolv.conf
{knotd} -c {conf} > {d}/knotd53.log 2>&1 &
KNOT=$!
{python} - <<'EOF'
import time, dns.message, dns.query
deadline = time.monotonic() + 10
while True:
    try:
        r = dns.query.tcp(dns.message.make_query("example.test.", "SOA"), "127.0.0.1", port=53, timeout=0.5)
        if r.answer:
            break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
EOF
for f in {d}/msg-*.eml; do
    rc=0
    {testmsg} < "$f" > "$f.out" 2>&1 || rc=$?
    echo "$(basename "$f") $rc"
done
kill $KNOT
wait $KNOT || true
"""


def test_opendkim_testmsg_verifies_exmta_signatures(keys: authzones.Keys, tmp_path: Path) -> None:
    zones = authzones.zones(keys)
    server = knot.KnotServer(tmp_path, zones, port=53)
    conf = server.write_config()
    d = tmp_path / "x"
    d.mkdir()
    body = "Grüße aus Köln\r\n".encode()
    folded = "Subject: " + " ".join(["long"] * 60)
    messages = {
        "rsa": sign_message(message(body=body), [keys.rsa]),
        "ed25519": sign_message(message(body=body), [keys.ed]),
        "rsa-folded": sign_message(message().replace(b"Subject: test", folded.replace(" long", "\r\n long", 30)
                                                     .encode()), [keys.rsa]),
        "rsa-tampered": sign_message(message(body=body), [keys.rsa]).replace(b"K\xc3\xb6ln", b"Bonn"),
        "unsigned": message(),
    }
    for name, data in messages.items():
        (d / f"msg-{name}.eml").write_bytes(data)
    script = NETNS_SCRIPT.format(d=d, knotd=knot.KNOTD, conf=conf, testmsg=TESTMSG, python=sys.executable)
    out = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    rcs = dict(line.split() for line in out.stdout.splitlines())
    details = {name: (d / f"msg-{name}.eml.out").read_text() for name in messages}
    print(rcs, details)
    assert rcs["msg-rsa.eml"] == "0", details["rsa"]
    assert rcs["msg-rsa-folded.eml"] == "0", details["rsa-folded"]
    assert rcs["msg-rsa-tampered.eml"] != "0" and "Bad signature" in details["rsa-tampered"]
    assert rcs["msg-unsigned.eml"] != "0" and "No signature" in details["unsigned"]
    assert rcs["msg-ed25519.eml"] == "0", details["ed25519"]
