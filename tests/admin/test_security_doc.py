"""docs/security.rst: its TOML block is a valid configuration and its defaults are the code's."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from exmta.admin import status
from exmta.admin.httpguard import ADMIN_MAX_BODY, METRICS_METHODS
from exmta.admin.status.newest import MAX_BYTES
from exmta.config.load import parse_config
from exmta.config.schema import AdminConfig, BackPressureConfig, MetricsConfig, ReceiveConnectorConfig
from exmta.filemodes import SERVER_UMASK
from exmta.queue.pickup import PickupDirectory

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.rst"


def toml_blocks(text: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text, re.M):
        blocks.append("\n".join(line[4:] for line in m.group(1).splitlines()))
    return blocks


def test_toml_blocks_are_valid_configuration() -> None:
    blocks = toml_blocks(DOC.read_text())
    assert len(blocks) == 1
    config = parse_config({"receive": {"default": {}}, **tomllib.loads(blocks[0])})
    assert config.admin.allowed_networks == ("127.0.0.0/8", "::1/128")
    assert config.metrics.allowed_networks == ("127.0.0.0/8", "192.0.2.0/24")


def test_documented_defaults_are_the_code_defaults() -> None:
    text = " ".join(DOC.read_text().split())
    rc = ReceiveConnectorConfig(name="x")
    rows = {
        "``max_message_size``": f"{rc.max_message_size // 2**20} MiB",
        "``max_recipients``": str(rc.max_recipients),
        "``max_errors``": f"{rc.max_errors}, then 421",
        "``max_command_line``": f"{rc.max_command_line} octets",
        "``max_text_line``": f"{rc.max_text_line} octets",
        "``command_timeout``": f"{int(rc.command_timeout // 60)} min",
        "``data_timeout``": f"{int(rc.data_timeout // 60)} min",
        "``max_connections``": str(rc.max_connections),
        "``max_connections_per_ip``": str(rc.max_connections_per_ip),
        "``auth_tarpit``": f"{rc.auth_tarpit:g} s before each 535",
        "``auth_lockout_*``": f"{rc.auth_lockout_source_failures} and {rc.auth_lockout_user_failures} per "
                              f"{int(rc.auth_lockout_window // 60)} min",
    }
    for setting, default in rows.items():
        assert re.search(re.escape(setting) + r" [^`]*? " + re.escape(default) + r"( |$)", text), (setting, default)
    assert rc.messages_per_minute_per_ip == 0 and rc.bare_lf == "reject"
    assert BackPressureConfig().min_free_disk == 100 * 2**20 and "(100 MiB by default)" in text
    assert ADMIN_MAX_BODY == 4096 and "4 KiB, 413" in text
    assert METRICS_METHODS == {b"GET", b"HEAD"} and "GET/HEAD only, 405" in text
    assert AdminConfig().allowed_networks == ("127.0.0.0/8", "::1/128")
    assert MetricsConfig().allowed_networks == ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
                                                "192.168.0.0/16", "fc00::/7")
    assert "loopback, 10/8, 172.16/12, 192.168/16, fc00::/7" in text
    assert MAX_BYTES == 64 * 2**20 and status.MAX_SEARCHES == 2
    assert "100 newest matches," in text and "64 MiB read, 2 at once" in text
    assert SERVER_UMASK == 0o027 and "umask to at least 027" in text
    assert PickupDirectory.__init__.__kwdefaults__["max_size"] == 36 * 2**20 and "read up to 36 MiB + 1" in text
