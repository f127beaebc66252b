"""Benchmark kinds by name, in one registry (``chatvec.core.registry``).

A kind is a ``chatvec.eval.kinds.base.Kind`` subclass. The shipped kinds are registered below by
``"module:class"`` (imported when first used). To add one, register it the same way before the
run, by class or by location: ``KINDS.register("riddle", RiddleKind)``, or
``register_kind(RiddleKind)``, which takes the name from the class (usable as a decorator).
"""

from __future__ import annotations

from chatvec.core.registry import Registry
from chatvec.eval.kinds.base import Kind

KINDS: Registry[type[Kind]] = Registry("benchmark kind")
KINDS.register("chat", "chatvec.eval.kinds.chat:ChatKind", summary="open answers judged 0-10 against a reference")
KINDS.register("choice", "chatvec.eval.kinds.choice:ChoiceKind", summary="multiple choice by log-likelihood")
KINDS.register("multiturn", "chatvec.eval.kinds.multiturn:MultiturnKind", summary="two-turn chat, judged")
KINDS.register("perplexity", "chatvec.eval.kinds.perplexity:PerplexityKind", summary="perplexity of reference text")
KINDS.register("safety", "chatvec.eval.kinds.safety:SafetyKind", summary="unsafe rate by judge, refusal rate")
KINDS.register("task", "chatvec.eval.kinds.task:TaskKind", summary="exact answers checked by rule")
KINDS.register(
    "toxicity", "chatvec.eval.kinds.toxicity:ToxicityKind", summary="continuations scored by a toxicity classifier"
)
KINDS.register("lm-eval", "chatvec.eval.kinds.lmeval:LmEvalKind", summary="an lm-evaluation-harness task")


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    KINDS.register(cls.name, cls)
    return cls


def kind_class(name: str) -> type[Kind]:
    return KINDS[name]


def get_kind(name: str) -> Kind:
    return kind_class(name)()


def kind_names() -> list[str]:
    return sorted(KINDS.names())
