"""Filter plugins are found by entry-point name and checked against the interfaces."""
import pytest
from zope.interface import implementer, provider

from exmta.config.load import ConfigError
from exmta.interfaces import IFilterFactory, IMessageFilter
from exmta.model import Verdict
from exmta.plugins import FilterEnv, load_filters, ordered

ENV = FilterEnv(reactor=None, clock=None, threadpool=None, hostname="mx.example.test", data_dir="/tmp")


@implementer(IMessageFilter)
@provider(IFilterFactory)
class Tagger:
    def __init__(self, name, tag):
        self.name, self.tag = name, tag

    @classmethod
    def from_config(cls, name, config, env):
        if "tag" not in config:
            raise ValueError("tag: is required")
        return cls(name, config["tag"])

    def on_connect(self, session):
        return Verdict.CONTINUE

    def on_helo(self, session):
        return Verdict.CONTINUE

    def on_mail(self, session, sender, params):
        return Verdict.CONTINUE

    def on_rcpt(self, session, txn, rcpt, params):
        return Verdict.CONTINUE

    def on_data(self, session, txn, message):
        return Verdict.CONTINUE


class NotAFactory:
    pass


@provider(IFilterFactory)
class BuildsJunk:
    @classmethod
    def from_config(cls, name, config, env):
        return object()


def finder(group):
    assert group == "exmta.filters"
    return {"tagger": Tagger, "plain": NotAFactory, "junk": BuildsJunk}


def test_builds_named_instances_with_their_config():
    built = load_filters({"t1": {"plugin": "tagger", "tag": "[EXT]", "timeout": "5s"}}, ENV, find=finder)
    assert isinstance(built["t1"], Tagger)
    assert built["t1"].name == "t1" and built["t1"].tag == "[EXT]"
    assert ordered(built, ["t1"]) == [built["t1"]]


def test_all_plugin_problems_reported_together():
    specs = {
        "a": {"plugin": "missing"},
        "b": {"plugin": "plain"},
        "c": {"plugin": "junk"},
        "d": {"plugin": "tagger"},
    }
    with pytest.raises(ConfigError) as info:
        load_filters(specs, ENV, source="x.toml", find=finder)
    problems = info.value.problems
    assert problems[0].startswith("filters.a.plugin: no filter plugin 'missing' is installed (installed: junk, plain, tagger)")
    assert problems[1].startswith("filters.b.plugin: 'plain' does not provide IFilterFactory")
    assert problems[2].startswith("filters.c: plugin 'junk' built an object that is not an IMessageFilter")
    assert problems[3] == "filters.d: tag: is required"


def test_real_entry_point_group_is_queried():
    # nothing is installed under our group by default, so a name is reported as missing
    with pytest.raises(ConfigError) as info:
        load_filters({"x": {"plugin": "surely-not-installed"}}, ENV)
    assert "no filter plugin 'surely-not-installed' is installed" in info.value.problems[0]


def test_check_filters_uses_the_config_check_hook_instead_of_building():
    """`exmta check-config` asks a factory's check_config(name, config) when it has one (issue 12, item 2)."""
    from exmta.plugins import check_filters

    built, checked = [], []

    @provider(IFilterFactory)
    class Hooked(Tagger):
        @classmethod
        def from_config(cls, name, config, env):
            built.append(name)  # would open files or connections: not during a check
            return super().from_config(name, config, env)

        @staticmethod
        def check_config(name, config):
            checked.append((name, config))
            if "tag" not in config:
                raise ValueError("tag: is required")

    find = lambda group: {"hooked": Hooked, "tagger": Tagger}  # noqa: E731
    specs = {"a": {"plugin": "hooked", "tag": "x", "timeout": 5.0}, "b": {"plugin": "hooked"},
             "c": {"plugin": "tagger"}, "d": {"plugin": "nope"}}
    problems = check_filters(specs, "mx.example.test", "/tmp", find=find)
    assert built == [] and checked == [("a", {"tag": "x"}), ("b", {})]  # core keys are not the plugin's
    assert problems[:2] == ["filters.b: tag: is required", "filters.c: tag: is required"]
    assert problems[2].startswith("filters.d.plugin: no filter plugin 'nope' is installed")
