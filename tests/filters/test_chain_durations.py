"""A filter's ``timeout`` may be a duration string, as docs/filters.rst shows (twistd refused "5s")."""
from __future__ import annotations

from twisted.internet.task import Clock

from exmta.filters import FilterBase, FilterChain


class Named(FilterBase):
    name = "extag"


def test_timeout_as_a_duration_string() -> None:
    chain = FilterChain([Named()], Clock(), per_filter={"extag": {"plugin": "extag", "timeout": "5s"},
                                                        "other": {"timeout": 2}})
    assert chain.settings_for(Named()) == (5.0, "tempfail")
    assert chain._settings["other"] == (2.0, "tempfail")
