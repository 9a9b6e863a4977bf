"""MailParams.to_json lists its fields by hand (dataclasses.asdict was a visible part of receive CPU):
a field added later must not be left out of the envelope."""
from __future__ import annotations

from dataclasses import fields

from exmta.model import Body, MailParams


def test_to_json_has_every_field_in_order_and_round_trips() -> None:
    params = MailParams(size=5, body=Body.EIGHT_BIT, smtputf8=True, ret="FULL", envid="e1", auth="<>")
    data = params.to_json()
    assert list(data) == [f.name for f in fields(MailParams)]
    assert data["body"] == "8BITMIME"
    assert MailParams.from_json(data) == params
    assert MailParams.from_json(MailParams().to_json()) == MailParams()
