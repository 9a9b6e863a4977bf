"""docs/exchange-online-oauth2.rst as written: its openssl command makes the certificate its TOML names,
and the TOML passes check-config (with a minimal [receive] added, as the page shows only the connector)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from support.rst import literal_blocks as rst_literal_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "exchange-online-oauth2.rst"


def literal_blocks() -> list[str]:
    """Every ``::`` literal block of the page, dedented."""
    return rst_literal_blocks(DOC)


def test_doc_certificate_and_connector_pass_check_config(tmp_path: Path) -> None:
    blocks = literal_blocks()
    (openssl,) = [b for b in blocks if b.startswith("openssl ")]
    (toml,) = [b for b in blocks if b.startswith("[send.exo]")]
    subprocess.run(shlex.split(openssl.replace("\\\n", " ")), cwd=tmp_path, check=True, capture_output=True,
                   timeout=60)
    config = '[receive.lan]\nlisten = ["tcp:2525"]\nremote_ranges = ["192.168.10.0/24"]\n\n' + toml
    (tmp_path / "exo.toml").write_text(config)
    r = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", "exo.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    from exmta.config.load import load_config

    (sc,) = [s for s in load_config(str(tmp_path / "exo.toml")).send if s.name == "exo"]
    assert sc.oauth2.send_as == "sender" and sc.oauth2.certificate == str(tmp_path / "exo-app.pem")


def test_doc_key_list_matches_the_schema() -> None:
    """Every [send.NAME.oauth2] key is documented, and nothing else is."""
    import dataclasses

    from exmta.config.schema import OAuth2Config

    text = DOC.read_text()
    section = text[text.index("The keys of ``[send.NAME.oauth2]``"):text.index("``check-config`` refuses")]
    documented = set(re.findall(r"^``(\w+)``", section, flags=re.M)) | set(re.findall(r", ``(\w+)``", section))
    documented |= set(re.findall(r"\(\+ ``(\w+)``\)", section))
    assert documented == {f.name for f in dataclasses.fields(OAuth2Config)}
