"""Per-layer and per-module ratios (a "schedule"): where a recipe takes a number, it may also take

* a number: the same for every tensor, as before;
* a list of control points, ``[0.2, 1.0, 0.4]``: a piecewise-linear curve over the layers' depth;
* a mapping of module groups, ``{self_attn: [0.5, 1, 0.5], lm_head: 0, default: 1}``: a group is
  any part of a tensor name (a substring, as mergekit's ``filter``); the first group in the
  mapping's order that a tensor's name contains decides its value, else ``default``. Without a
  ``default`` every tensor must match a group (the plan lists those that match none), and a group
  that matches no tensor of the CP model is an error too (a typo would otherwise merge silently).

Depth follows mergekit's gradients exactly (mergekit/config.py ``evaluate_setting`` and
mergekit/plan.py): with n layers, layer i sits at t = i / (n - 1) (t = 1 when n is 1); tensors
outside the layers sit at t = 0 when they are input embeddings (mergekit's "pre" weights) and at
t = 1 otherwise (final norm, LM head: its "post" weights). k control points p are evenly spaced
over [0, 1], and the value at t is, in float64 as mergekit computes it::

    s = t * (k - 1);  i0 = int(s);  i1 = min(k - 1, i0 + 1);  f = s - i0
    value = (1 - f) * p[i0] + f * p[i1]

The layer index comes from the tensor name (``layers.N.``, ``h.N.``, ``blocks.N.``, ``layer.N.``,
``block.N.``), n from the CP model's config (``num_hidden_layers``, ``n_layer``, ``num_layers``,
``n_layers``, also under ``text_config``) or else the largest index seen + 1. A checkpoint with
several stacks (a vision tower beside the decoder) counts each stack's own layers; the config's
number applies to the stack with the most tensors, and a layer past it (an extra prediction
layer) sits at t = 1.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator

Points = tuple[float, ...]
Value = float | Points  # a number, or control points over depth


@dataclass(frozen=True)
class Groups:
    """The mapping form: (pattern, value) pairs in the order given, and the fallback."""

    groups: tuple[tuple[str, Value], ...]
    default: Value | None = None


ScheduleValue = float | Points | Groups

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")
_INPUT_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")
_OUTPUT_HEAD = re.compile(r"lm_head|embed_out")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_TEXT_CONFIGS = ("text_config", "llm_config", "language_config")


# -- parsing -------------------------------------------------------------------------------------
def _number(x: Any, what: str, low: float | None, high: float | None) -> float:
    try:
        # numbers, and text that is one (as pydantic's float fields take it); not booleans
        v = float(x) if not isinstance(x, (bool, list, tuple, dict)) and x is not None else None
    except (TypeError, ValueError):
        v = None
    if v is None:
        raise ValueError(f"{what}: {x!r} is not a number")
    if not math.isfinite(v):
        raise ValueError(f"{what}: {x!r} is not a finite number")
    if low is not None and v <= low:
        raise ValueError(f"{what}: {v:g} must be greater than {low:g}")
    if high is not None and v > high:
        raise ValueError(f"{what}: {v:g} must be at most {high:g}")
    return v


def _value(x: Any, what: str, low: float | None, high: float | None) -> Value:
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{what}: an empty list; give at least one control point")
        return tuple(_number(p, what, low, high) for p in x)
    if isinstance(x, dict):
        raise ValueError(f"{what}: a group's value is a number or a list of numbers, not a mapping")
    return _number(x, what, low, high)


def parse_schedule(x: Any, what: str = "ratio", low: float | None = None, high: float | None = None) -> ScheduleValue:
    """A number, a list of control points or a mapping of groups, checked; ValueError says what is wrong.

    `low` (exclusive) and `high` (inclusive) bound every number given."""
    if isinstance(x, (Groups, float)) and not isinstance(x, bool):
        if isinstance(x, float):
            return _number(x, what, low, high)
        return x
    if not isinstance(x, dict):
        return _value(x, what, low, high)
    if not x:
        raise ValueError(f"{what}: an empty mapping; give groups such as {{default: 1.0, self_attn: 0.5}}")
    groups, default = [], None
    for key, v in x.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(
                f"{what}: group {key!r} is not a name pattern; use a part of a tensor name, e.g. self_attn"
            )
        if key == "default":
            default = _value(v, f"{what}.default", low, high)
        else:
            groups.append((key, _value(v, f"{what}.{key}", low, high)))
    if not groups:
        return default  # {default: x} is x
    return Groups(tuple(groups), default)


def to_plain(v: ScheduleValue) -> float | list | dict:
    """The YAML form of a schedule (what the recipe would say)."""
    if isinstance(v, Groups):
        out: dict[str, Any] = {k: list(x) if isinstance(x, tuple) else x for k, x in v.groups}
        if v.default is not None:
            out["default"] = list(v.default) if isinstance(v.default, tuple) else v.default
        return out
    return list(v) if isinstance(v, tuple) else v


def fingerprint_form(v: ScheduleValue) -> float | list | dict:
    """JSON for the recipe fingerprint: a number stays a number (so scalar recipes keep their
    fingerprints); the groups' order decides the result, so it is kept as a list of pairs."""
    if isinstance(v, Groups):
        pairs = [[k, list(x) if isinstance(x, tuple) else x] for k, x in v.groups]
        default = list(v.default) if isinstance(v.default, tuple) else v.default
        return {"groups": pairs, "default": default}
    return list(v) if isinstance(v, tuple) else float(v)


def is_scalar(v: ScheduleValue) -> bool:
    return isinstance(v, float)


def schedule_values(v: ScheduleValue) -> list[float]:
    """Every number a schedule names (control points, groups' values and default)."""
    if isinstance(v, Groups):
        parts = [x for _k, x in v.groups] + ([v.default] if v.default is not None else [])
    else:
        parts = [v]
    return [p for x in parts for p in (x if isinstance(x, tuple) else (x,))]


def format_schedule(v: ScheduleValue) -> str:
    """Compact text: 0.5, [0.2, 1, 0.4], {self_attn: [0.5, 1, 0.5], default: 1}."""

    def one(x: Value) -> str:
        return "[" + ", ".join(f"{p:g}" for p in x) + "]" if isinstance(x, tuple) else f"{x:g}"

    if isinstance(v, Groups):
        items = [f"{k}: {one(x)}" for k, x in v.groups]
        if v.default is not None:
            items.append(f"default: {one(v.default)}")
        return "{" + ", ".join(items) + "}"
    return one(v)


def parse_ratio_text(text: str, what: str = "--ratio") -> ScheduleValue:
    """A command-line value: a number, or YAML flow text such as '[0.2, 1.0, 0.4]' or
    '{default: 1, self_attn: [0.5, 1, 0.5]}'. ValueError says what is wrong."""
    import yaml

    try:
        return parse_schedule(float(text), what)
    except ValueError:
        pass
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(
            f"{what} {text!r} is not a number or YAML flow text such as '[0.2, 1.0, 0.4]' or "
            "'{default: 1, self_attn: [0.5, 1, 0.5]}'"
        ) from None
    return parse_schedule(data, what)


def _annotated(what: str, low: float | None = None, high: float | None = None):
    return Annotated[
        ScheduleValue,
        PlainValidator(lambda x: parse_schedule(x, what, low, high)),
        PlainSerializer(to_plain),
    ]


# pydantic field types: a recipe's `ratio` (any finite numbers) and `density` (in (0, 1])
Ratio = _annotated("ratio")
Density = _annotated("density", 0.0, 1.0)


# -- layers and depth ----------------------------------------------------------------------------
def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (model.layers.3.mlp... -> 3), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _stack_of(name: str) -> str | None:
    m = _LAYER.search(name)
    return name[: m.start(1) - 1] if m else None


def num_layers(config: dict | None) -> int | None:
    """The decoder's number of layers from a config.json (the text model's, for multimodal ones)."""
    for cfg in [(config or {}).get(k) for k in _TEXT_CONFIGS] + [config]:
        if isinstance(cfg, dict):
            for key in _LAYER_KEYS:
                if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool) and cfg[key] > 0:
                    return cfg[key]
    return None


def module_group(name: str) -> str:
    """The module a tensor belongs to: the part after the layer index (self_attn, mlp,
    input_layernorm), or outside the layers the module that holds it (embed_tokens, norm, lm_head)."""
    m = _LAYER.search(name)
    if m:
        rest = name[m.end() + 1 :].split(".")
        return rest[0] if rest and rest[0] else name
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def module_groups(names: list[str]) -> list[str]:
    """The module groups of `names`: those inside the layers first, each once, in order seen."""
    inside = [module_group(n) for n in names if layer_of(n) is not None]
    return list(dict.fromkeys(inside + [module_group(n) for n in names if layer_of(n) is None]))


class Depth:
    """Where each tensor sits over the depth of the CP model, t in [0, 1] (mergekit's t)."""

    def __init__(self, names: list[str], config: dict | None) -> None:
        seen: dict[str, int] = {}
        count: Counter[str] = Counter()
        for n in names:
            stack, i = _stack_of(n), layer_of(n)
            if stack is not None and i is not None:
                seen[stack] = max(seen.get(stack, 0), i + 1)
                count[stack] += 1
        self.layers = dict(seen)
        configured = num_layers(config)
        if count and configured is not None:
            self.layers[count.most_common(1)[0][0]] = configured

    def t(self, name: str) -> float:
        i = layer_of(name)
        if i is None:
            return 0.0 if _INPUT_EMBEDDING.search(name) and not _OUTPUT_HEAD.search(name) else 1.0
        n = self.layers.get(_stack_of(name) or "", i + 1)
        return 1.0 if n <= 1 else min(1.0, i / (n - 1))


def gradient_at(points: Points, t: float) -> float:
    """mergekit's interpolation of evenly spaced control points at t (see the module docstring)."""
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * points[i0] + frac * points[i1]


class Resolver:
    """One schedule over one CP model: the value of each tensor, and what is wrong with it."""

    def __init__(self, value: ScheduleValue, depth: Depth) -> None:
        self.value = value
        self.depth = depth

    def _pick(self, name: str) -> Value | None:
        v = self.value
        if not isinstance(v, Groups):
            return v
        for pattern, x in v.groups:
            if pattern in name:
                return x
        return v.default

    def __call__(self, name: str) -> float | None:
        """The tensor's value; None when a mapping without `default` names no group of it."""
        x = self._pick(name)
        if isinstance(x, tuple):
            return float(gradient_at(x, self.depth.t(name)))
        return x

    def problems(self, names: list[str], what: str, tied: bool = False) -> list[str]:
        """A group that matches none of `names` (the CP model's float tensors), and tensors that
        match no group when there is no default."""
        v = self.value
        if not isinstance(v, Groups):
            return []
        out = []
        for pattern, _x in v.groups:
            if not any(pattern in n for n in names):
                found = ", ".join(module_groups(names))
                hint = ""
                if tied and _OUTPUT_HEAD.search(pattern):
                    hint = " (this CP model ties its LM head to the input embeddings: name the embeddings instead)"
                out.append(
                    f"{what}: group {pattern!r} matches no tensor of the CP model{hint}; its module groups are "
                    f"{found} (a group is any part of a tensor name, e.g. q_proj or layers.3.)"
                )
        if v.default is None:
            left = [n for n in names if not any(p in n for p, _x in v.groups)]
            if left:
                out.append(
                    f"{what}: {len(left)} tensor(s) match no group and there is no `default`: "
                    f"{', '.join(module_groups(left))}; add `default: VALUE` or a group for them"
                )
        return out
