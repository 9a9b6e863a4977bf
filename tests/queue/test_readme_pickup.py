"""README's pickup example, run as typed: the file it writes is queued with the envelope the text describes."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from exmta.queue.pickup import parse_pickup

README = (Path(__file__).resolve().parents[2] / "README.rst").read_text()


def test_readme_pickup_commands_make_a_valid_pickup_file(tmp_path):
    lines = [line.strip() for line in README.splitlines()
             if re.match(r"\s+(printf .*> message\.tmp|mv message\.tmp)", line)]
    assert len(lines) == 2
    (tmp_path / "exmta-data" / "pickup").mkdir(parents=True)
    script = "\n".join(re.sub(r"\s+#.*$", "", line) for line in lines)
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True, timeout=60)
    data = (tmp_path / "exmta-data" / "pickup" / "message.eml").read_bytes()
    content, envelope = parse_pickup(data, "mx.example.test", 1_700_000_000.0)
    assert envelope.sender == "bob@example.test"
    assert [r.address for r in envelope.recipients] == ["alice@example.test"]
    assert b"Subject: picked up\r\n" in content and b"Message-ID:" in content


def test_exported_headers_give_the_envelope_back():
    """`queue export` adds X-Sender/X-Receiver; pickup takes them as the envelope and removes them (Replay)."""
    data = (b"X-Sender: <a@x.test>\r\nX-Receiver: <b@y.test>\r\nX-Receiver: <c@y.test>\r\n"
            b"From: other@x.test\r\nTo: someone@z.test\r\nSubject: s\r\n\r\nbody\r\n")
    content, envelope = parse_pickup(data, "mx.example.test", 1_700_000_000.0)
    assert envelope.sender == "a@x.test" and [r.address for r in envelope.recipients] == ["b@y.test", "c@y.test"]
    assert b"X-Sender" not in content and b"X-Receiver" not in content
