"""Every rule shown in docs/rules.rst, README.rst and etc/rules.toml loads and does what the text says."""
from __future__ import annotations

import re
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
from support import mime_samples as S
from support.rulekit import ctx

from exmta.config.load import ConfigError, parse_config
from exmta.rules import load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "rules.rst"
README = ROOT / "README.rst"


def toml_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [textwrap.dedent(m.group(1)) for m in
            re.finditer(r"\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text)]


def literal_block(after: str) -> str:
    text = DOC.read_text()
    start = text.index(after) + len(after)
    m = re.match(r"\n\n((?:    .*\n|\n)+)", text[start:])
    assert m, f"no literal block after {after!r}"
    return textwrap.dedent(m.group(1))


def vip_module() -> types.ModuleType:
    module = types.ModuleType("exmta_vip")
    exec(compile(literal_block("``exmta_vip/__init__.py``::"), str(DOC), "exec"), module.__dict__)
    return module


def plugins() -> dict:
    vip = vip_module()
    return {"condition": {"SenderIsVip": vip.SenderIsVip}, "action": {"SetImportance": vip.SetImportance}}


def test_every_toml_block_in_the_docs_loads():
    blocks = toml_blocks(DOC)
    assert len(blocks) == 8
    for block in blocks:
        parse_rules(tomllib.loads(block), "docs/rules.rst", plugins=plugins())


def test_the_transport_rules_config_block_is_valid(tmp_path):
    text = DOC.read_text()
    block = textwrap.dedent(re.search(r"configuration file::\n\n((?:    .*\n|\n)+)", text).group(1))
    (tmp_path / "rules.toml").write_text(toml_blocks(DOC)[1])
    raw = tomllib.loads(block + '\n[receive.in]\nlisten = ["tcp:0"]\n')
    config = parse_config(raw, str(tmp_path / "exmta.toml"))
    assert config.transport_rules.limits == (("max_depth", 30), ("max_parts", 2000))


def five_rules() -> str:
    return "\n".join(toml_blocks(DOC)[1:7])


INTERNAL = {"internal_domain": lambda d: d in ("example.com", "finance.example.com")}


@pytest.mark.parametrize("source", ["docs", "readme", "etc"])
def test_the_common_rules_do_what_the_text_says(source):
    if source == "docs":
        ruleset = parse_rules(tomllib.loads(five_rules()), "docs")
    elif source == "readme":
        (block,) = toml_blocks(README)
        ruleset = parse_rules(tomllib.loads(block), "README")
    else:
        ruleset = load_rules(str(ROOT / "etc" / "rules.toml"))
    names = [r.name for r in ruleset.rules]
    # disclaimer on internal -> external mail
    inside = S.ALTERNATIVE_INLINE.replace(b"alice@example.test", b"alice@example.com")
    d = ruleset.evaluate(ctx(inside, "alice@example.com", "bob@partner.test", trusted=True, **INTERNAL))
    assert "This message is confidential" in d.apply_to(inside).decode()
    # payroll: refused alone when others are on the message, the whole message otherwise
    d = ruleset.evaluate(ctx(S.PLAIN, "x@outside.example", "payroll@example.com", "ann@example.com", **INTERNAL))
    assert list(d.rejected_recipients) == ["payroll@example.com"] and d.reject is None
    d = ruleset.evaluate(ctx(S.PLAIN, "x@outside.example", "payroll@example.com", **INTERNAL))
    assert str(d.reject) == "550 5.7.901 Payroll accepts mail from inside the company only"
    # finance copies
    d = ruleset.evaluate(ctx(S.PLAIN, "cfo@finance.example.com", "ann@example.com", trusted=True, **INTERNAL))
    assert d.add_recipients == ["compliance@example.com"]
    # external tag, with the partner exception
    d = ruleset.evaluate(ctx(S.PLAIN, "x@outside.example", "ann@example.com", **INTERNAL))
    assert ("replace", "Subject", "[EXTERNAL] hello") in d.header_ops
    d = ruleset.evaluate(ctx(S.PLAIN.replace(b"From: alice@example.test", b"From: p@partner.example"),
                             "p@partner.example", "ann@example.com", **INTERNAL))
    assert d.header_ops == []
    if "Partner over TLS" in names:
        d = ruleset.evaluate(ctx(S.PLAIN, "alice@example.com", "x@partner.example", trusted=True, **INTERNAL))
        assert d.route_connector == "partner-tls" and d.require_tls
    else:
        assert source == "etc"  # commented out there: it needs [send.partner-tls]


def test_documented_extension_example_and_its_test():
    vip = vip_module()
    namespace = {"SenderIsVip": vip.SenderIsVip, "SetImportance": vip.SetImportance}
    exec(compile(literal_block("``test_exmta_vip.py``::"), str(DOC), "exec"), namespace)
    namespace["test_vip_mail_is_marked_important"]()


def test_documented_extension_errors_name_rule_and_key():
    block = toml_blocks(DOC)[-1].replace('["ceo@example.com", "chair@example.com"]', '"ceo"')
    with pytest.raises(ConfigError) as e:
        parse_rules(tomllib.loads(block), "<doc>", plugins=plugins())
    assert e.value.problems == ["rule 'VIP mail is important'.conditions.SenderIsVip: must be a list of addresses"]


def test_an_extension_that_is_not_one_is_refused_by_name():
    from exmta.rules.plugins import discover

    class NotAnExtension:
        pass
    found, problems = discover(lambda group: {"Broken": NotAnExtension})
    assert found == {"condition": {}, "action": {}}
    assert problems and problems[0].startswith("rule extension 'Broken' does not provide IRuleExtension")


def test_the_model_snippets_run(capsys):
    from twisted.internet.defer import Deferred

    from exmta.filters.base import MessageView
    namespace = {"raw": S.FORWARDED}
    exec(compile(literal_block("``AttachmentProcessingLimitExceeded``\ntests::"), str(DOC), "exec"), namespace)
    assert "invoice.zip application/zip application/zip 22" in capsys.readouterr().out
    namespace = {}
    exec(compile(literal_block("encrypted``)::"), str(DOC), "exec"), namespace)
    env = types.SimpleNamespace(reactor=None, threadpool=None)  # no pool: the loader runs inline
    done: list = []
    Deferred.fromCoroutine(namespace["on_data"](types.SimpleNamespace(env=env), None, None,
                                                MessageView(S.FORWARDED))).addBoth(done.append)
    assert done == [None]


def command_lines(path: Path) -> list[list[str]]:
    """Every ``exmta rules ...`` command of the file's literal blocks (continuation lines joined)."""
    import shlex
    text = path.read_text().replace("\\\n", " ")
    return [shlex.split(m.group(1)) for m in re.finditer(r"^ {4}exmta (rules .*)$", text, re.M)]


@pytest.mark.parametrize("path", [DOC, README], ids=["docs", "readme"])
def test_the_documented_commands_run(path, tmp_path, monkeypatch, capsys):
    from exmta.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules.toml").write_text(five_rules())
    (tmp_path / "exmta.toml").write_text(f'[receive.in]\nlisten = ["tcp:0"]\n[send.partner-tls]\n'
                                         f'smarthosts = ["[127.0.0.1]:2601"]\n[[route]]\ndomains = ["*"]\n'
                                         f'connector = "partner-tls"\n[accepted_domains]\n"example.com" = '
                                         f'"authoritative"\n[transport_rules]\nfile = "{tmp_path}/rules.toml"\n')
    (tmp_path / "message.eml").write_bytes(S.PLAIN)
    export = (Path(__file__).parent / "fixtures" / "transport-rules-export.xml").read_bytes()
    (tmp_path / "rules.xml").write_bytes(export)
    (tmp_path / "exported-rules.xml").write_bytes(export)
    commands = command_lines(path)
    assert len(commands) >= 2
    for argv in commands:
        argv = [a.replace("/etc/exmta/", str(tmp_path) + "/") for a in argv]
        if argv[1] == "import":
            out = Path(argv[argv.index("-o") + 1])
            out.unlink(missing_ok=True)  # the import never overwrites
        assert main(argv) in (0, 1), (argv, capsys.readouterr())
    assert "MATCH: 'Payroll takes internal mail only'" in capsys.readouterr().out


def test_the_documented_entry_points_resolve_to_the_example():
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read_string(literal_block("Its ``setup.cfg`` declares the entry points:\n\n.. code-block:: ini"))
    entries = [line.split("=") for line in cfg["options.entry_points"]["exmta.rules"].strip().splitlines()]
    vip = vip_module()
    for name, target in entries:
        module, _, attr = target.strip().partition(":")
        assert module == "exmta_vip" and getattr(vip, attr).kind in ("condition", "action") and name.strip() == attr
