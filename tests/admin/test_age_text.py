"""age_text: the one age formatter of the queue commands and the status page."""
from __future__ import annotations

from exmta.admin import client, status


def test_age_text_units() -> None:
    assert client.age_text(None) == "-"
    assert client.age_text(42.9) == "42s"
    assert client.age_text(119) == "119s"
    assert client.age_text(300) == "5m"
    assert client.age_text(3 * 3600 + 7 * 60) == "3h07m"
    assert client.age_text(2 * 86400 + 4 * 3600) == "2d4h"


def test_status_page_uses_the_same_formatter() -> None:
    assert status.age_text is client.age_text
