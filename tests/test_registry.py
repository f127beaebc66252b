"""One way to register a command, an engine, a benchmark kind, a judge backend, a toxicity scorer and a
merge method."""

from __future__ import annotations

import pytest

from chatvec.core.errors import InputError
from chatvec.core.registry import Registry


def test_an_entry_by_location_is_imported_when_first_asked_for():
    reg: Registry = Registry("widget")
    reg.register("json", "json:dumps", summary="a serializer")
    assert reg.names() == ["json"] and "json" in reg and reg.summary("json") == "a serializer"
    assert reg.target("json") == "json:dumps"
    import json

    assert reg["json"] is json.dumps


def test_an_unknown_name_lists_the_known_ones():
    reg: Registry = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    with pytest.raises(InputError, match="unknown widget 'c'; choose one of: a, b"):
        reg["c"]


def test_register_works_as_a_decorator():
    reg: Registry = Registry("widget")

    @reg.register("thing")
    class Thing:
        pass

    assert reg["thing"] is Thing and reg.target("thing").endswith("Thing")


def test_every_sort_of_extension_point_is_a_registry():
    from chatvec.cli.main import COMMANDS
    from chatvec.eval.engines import ENGINES
    from chatvec.eval.judging import JUDGES, make_judge
    from chatvec.eval.kinds import KINDS, get_kind
    from chatvec.eval.toxicity_scorers import TOXICITY, make_toxicity, toxicity_identity
    from chatvec.merge.methods import METHODS

    for reg in (COMMANDS, ENGINES, JUDGES, KINDS, METHODS, TOXICITY):
        assert isinstance(reg, Registry)
    assert {"merge", "eval", "sweep"} <= set(COMMANDS.names())
    assert {"hf", "vllm"} <= set(ENGINES.names())
    assert {"add", "ties", "dare", "dare_ties"} <= set(METHODS.names())
    assert "openai" in JUDGES
    assert {"perspective", "hf"} <= set(TOXICITY.names())

    # a kind registered from outside is found like a shipped one
    from chatvec.eval.kinds.chat import ChatKind

    class RiddleKind(ChatKind):
        name = "riddle"

    KINDS.register("riddle", RiddleKind)
    try:
        assert isinstance(get_kind("riddle"), RiddleKind)
    finally:
        KINDS._entries.pop("riddle")

    # a judge backend registered by prefix is what --judge PREFIX:MODEL makes
    class EchoJudge:
        def __init__(self, model: str) -> None:
            self.identity = f"echo:{model}"

    JUDGES.register("echo", EchoJudge)
    try:
        assert make_judge("echo:m1", settings=None).identity == "echo:m1"
    finally:
        JUDGES._entries.pop("echo")

    # a toxicity scorer registered by name is what --toxicity NAME:ARGUMENT makes
    class LengthScorers:
        @staticmethod
        def identity(arg):
            return f"length:{arg}"

        @staticmethod
        def make(arg, settings):
            return arg

    TOXICITY.register("length", LengthScorers)
    try:
        assert toxicity_identity("length:10") == "length:10" and make_toxicity("length:10", None) == "10"
    finally:
        TOXICITY._entries.pop("length")
