"""exmta.receive.recipients: the recipient list file, its wildcards and reloading."""
from __future__ import annotations

import os

from twisted.internet.task import Clock

from exmta.model import Address
from exmta.receive.recipients import RecipientList, RecipientValidator, parse_recipient_list


def run(coro):
    """Drive a coroutine that never really waits (no thread pool, no lookups)."""
    from twisted.internet.defer import Deferred

    out = []
    Deferred.fromCoroutine(coro).addBoth(out.append)
    assert out
    return out[0]


def test_parse():
    exact, patterns = parse_recipient_list(
        "a@x.test\n  B@X.test  # comment\n# only comment\n\n*@all.test\nteam-?@x.test\nbroken\n@x\nx@\na b@x\n")
    assert exact == {"a@x.test", "b@x.test"}
    assert patterns == ("*@all.test", "team-?@x.test")


def test_reloaded_when_the_file_changes(tmp_path):
    path = tmp_path / "rcpts"
    path.write_text("one@x.test\n")
    clock = Clock()
    rl = RecipientList(str(path), clock, check_interval=2.0)
    v = RecipientValidator(rl)
    assert run(v.exists(Address("one", "x.test"))) is True
    assert run(v.exists(Address("two", "x.test"))) is False
    # replaced atomically, as an operator should
    new = tmp_path / "rcpts.new"
    new.write_text("two@x.test\n")
    os.replace(new, path)
    assert run(v.exists(Address("two", "x.test"))) is False  # not looked at again within check_interval
    clock.advance(2.0)
    assert run(v.exists(Address("two", "x.test"))) is True
    assert run(v.exists(Address("one", "x.test"))) is False
    assert rl.reloads == 2
    # unchanged file: not read again
    clock.advance(5)
    run(v.exists(Address("two", "x.test")))
    assert rl.reloads == 2


def test_a_vanished_file_keeps_the_last_good_list(tmp_path):
    path = tmp_path / "rcpts"
    path.write_text("one@x.test\n")
    clock = Clock()
    v = RecipientValidator(RecipientList(str(path), clock, check_interval=0))
    assert run(v.exists(Address("one", "x.test"))) is True
    path.unlink()
    assert run(v.exists(Address("one", "x.test"))) is True


def test_postmaster_always_exists_and_no_source_means_accept(tmp_path):
    path = tmp_path / "rcpts"
    path.write_text("")
    v = RecipientValidator(RecipientList(str(path), Clock()))
    assert run(v.exists(Address("PostMaster", "x.test"))) is True
    assert run(v.exists(Address("u", "x.test"))) is False
    assert RecipientValidator().enabled is False
    assert run(RecipientValidator().exists(Address("u", "x.test"))) is True
