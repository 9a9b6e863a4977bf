"""The status page as headless Chromium draws it: a screenshot, and no text drawn over other text.

The page is rendered from a real Observability with a deferred next hop; Chromium
measures every text of every chart (getBBox) and the test fails on any two that
overlap (the "Mean delivery latency per minute" title ran into its legend).
The screenshot is kept beside the test's files for a person to look at.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from exmta.admin.status import render_status
from exmta.config.load import parse_config
from exmta.observe.metrics import QueueSnapshot
from exmta.observe.runtime import build_observability
from exmta.testing.memstore import MemoryStore

pytestmark = pytest.mark.integration

MEASURE = """<script>
window.addEventListener("load", () => {
  const found = [];
  document.querySelectorAll("svg.chart").forEach((svg, i) => {
    const boxes = [...svg.querySelectorAll("text")].map(t => [t.textContent, t.getBBox()]);
    for (let a = 0; a < boxes.length; a++) for (let b = a + 1; b < boxes.length; b++) {
      const [ta, p] = boxes[a], [tb, q] = boxes[b];
      if (p.width > 0 && q.width > 0 && p.x < q.x + q.width && q.x < p.x + p.width &&
          p.y < q.y + q.height && q.y < p.y + p.height) found.push(`chart ${i}: "${ta}" / "${tb}"`);
    }
    const r = svg.getBoundingClientRect();
    boxes.forEach(([t, p]) => { if (p.x + p.width > r.width + 1) found.push(`chart ${i}: "${t}" past the edge`); });
  });
  const out = document.createElement("pre");
  out.id = "overlaps";
  out.textContent = `measured ${document.querySelectorAll("svg.chart text").length} texts\\n` + found.join("\\n");
  document.body.appendChild(out);
});
</script>"""


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: run scripts/install-test-deps.sh"
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", f"--user-data-dir={tmp / f'profile-{time.monotonic_ns()}'}",
            "--hide-scrollbars", "--virtual-time-budget=2000", *args]
    done = subprocess.run(argv, capture_output=True, timeout=120, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def status_page(tmp_path: Path) -> str:
    config = parse_config({"server": {"hostname": "mx.contoso.example"}, "receive": {"in": {}}})
    clock = Clock()
    clock.advance(1_700_000_000)
    obs = build_observability(config, clock, MemoryStore(clock),
                              {"queue": str(tmp_path / "q"), "data": str(tmp_path)})
    snap = QueueSnapshot(clock.seconds())
    snap.by_queue = {"deferred": 3}
    snap.by_nexthop = {"relay/fabrikam.example": 3}
    snap.oldest_by_nexthop = {"relay/fabrikam.example": clock.seconds() - 600}
    snap.oldest = clock.seconds() - 600
    snap.last_error = {"relay/fabrikam.example":
                       "451 4.4.1 Delivery to fabrikam.example temporarily suspended: Connection refused"}
    obs.sampler.snapshot = snap
    return render_status(obs)


def test_status_page_screenshot_has_no_overlapping_text(tmp_path: Path) -> None:
    html = status_page(tmp_path)
    assert "Mean delivery latency per minute" in html
    page = tmp_path / "status.html"
    page.write_text(html.replace("</body>", MEASURE + "</body>"))

    dom = chromium(["--dump-dom", page.as_uri()], tmp_path).stdout
    m = re.search(r'<pre id="overlaps">(.*?)</pre>', dom, re.S)
    assert m, "the measuring script did not run"
    lines = m.group(1).strip().splitlines()
    assert int(lines[0].split()[1]) >= 15, lines[0]  # every chart's title, axis labels and legend measured
    assert lines[1:] == [], "\n".join(lines[1:])

    shot = tmp_path / "status.png"
    chromium([f"--screenshot={shot}", "--window-size=900,1200", page.as_uri()], tmp_path)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (900, 1200)
    assert len(data) > 10_000  # a drawn page, not a blank one
