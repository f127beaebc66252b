"""`chatvec merge --mergekit-config config.yml`: mergekit's YAML for its task-vector methods.

Accepted (anything else is a ConfigError naming the key)::

    merge_method: task_arithmetic | ties | dare_ties | dare_linear
    base_model: BASE
    models:
      - model: CP
        parameters: {weight: 1.0}
      - model: CHAT
        parameters: {weight: 0.5, density: 0.9}
    parameters: {normalize: false, lambda: 1.0, rescale: true, weight: ..., density: ...}
    dtype: bfloat16

`weight` and `density` take mergekit's forms: a number, a gradient (a list of numbers over the
layers' depth) or a list of conditions, ``[{filter: self_attn, value: [0.2, 1.0, 0.4]}, {value: 0.5}]``
(the first whose `filter` is part of the tensor name, or that has none or ``*``, gives the value;
when none does, the top-level `parameters` are asked, then mergekit's default: none for `weight`,
which is then an error, 1 for `density`). They become a chatvec schedule (merge/schedule.py),
resolved per tensor as mergekit does.

The merge is then mergekit's general form, base + lambda * combine(weight_i, model_i - base),
computed as merge/gta.py says; for the chat vector: base_model BASE, models CP with weight 1 and
CHAT with weight R. Defaults per method as mergekit's: normalize for ties, rescale for the dare
methods, sign consensus for ties and dare_ties. A model equal to base_model is skipped, as
mergekit skips it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from chatvec.merge.recipe import MergekitMode, Recipe, VectorSpec
from chatvec.merge.schedule import ScheduleValue, parse_schedule

# mergekit's method -> chatvec's sparsification of each vector (merge/methods.py)
_SPARSIFY = {"task_arithmetic": "add", "ties": "ties", "dare_ties": "dare_ties", "dare_linear": "dare"}
_CONSENSUS = {"ties", "dare_ties"}
_NORMALIZE_BY_DEFAULT = {"ties"}
_RESCALE_BY_DEFAULT = {"dare_ties", "dare_linear"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Condition(_Strict):
    """mergekit's ConditionalParameter: `value` where `filter` is part of the tensor name."""

    value: float | list[float]
    filter: str | None = None


# mergekit's ParameterSetting: a number, a gradient, or conditions tried in order
Setting = float | list[float] | list[Condition]


class ModelParameters(_Strict):
    weight: Setting | None = None
    density: Setting | None = None


class ModelEntry(_Strict):
    model: str
    parameters: ModelParameters = ModelParameters()


class MergeParameters(ModelParameters):
    normalize: bool | None = None
    rescale: bool | None = None
    lambda_: float = Field(default=1.0, alias="lambda")
    int8_mask: bool = False  # only the dtype of mergekit's mask; the result is the same


class MergekitConfig(_Strict):
    merge_method: Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"]
    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
    parameters: MergeParameters = MergeParameters()
    dtype: Literal["bfloat16", "float16", "float32"] | None = None


def recipe_from_mergekit(config: MergekitConfig) -> Recipe:
    """The chatvec recipe (in mergekit mode) that computes `config`."""
    from chatvec.core.errors import ConfigError
    from chatvec.core.file_identity import normalize_uri

    method = config.merge_method
    p = config.parameters
    base = normalize_uri(config.base_model)
    vectors = []
    for i, entry in enumerate(config.models):
        if normalize_uri(entry.model) == base:
            continue
        if entry.parameters.weight is None and p.weight is None:
            raise ConfigError(f"models[{i}] ({entry.model}) has no weight: give parameters: {{weight: ...}}")
        weight = _schedule([entry.parameters.weight, p.weight], None, f"models[{i}] weight")
        density = _schedule([entry.parameters.density, p.density], 1.0, f"models[{i}] density")
        vectors.append(
            VectorSpec(
                base=config.base_model,
                chat=entry.model,
                ratio=weight,
                method=_SPARSIFY[method],
                density=density,
            )
        )
    if not vectors:
        raise ConfigError("the mergekit config lists no model besides base_model: nothing to merge")
    mode = MergekitMode(
        method=method,
        normalize=p.normalize if p.normalize is not None else method in _NORMALIZE_BY_DEFAULT,
        rescale=p.rescale if p.rescale is not None else method in _RESCALE_BY_DEFAULT,
        lambda_=p.lambda_,
        consensus=method in _CONSENSUS,
    )
    return Recipe(cp=config.base_model, vectors=vectors, dtype=config.dtype, mergekit=mode)


def _entries(setting: Setting | None) -> list[tuple[str | None, float | list[float]]]:
    if setting is None:
        return []
    if isinstance(setting, list) and setting and isinstance(setting[0], Condition):
        return [(c.filter, c.value) for c in setting]
    return [(None, setting)]


def _schedule(settings: list[Setting | None], fallback: float | None, what: str) -> ScheduleValue:
    """mergekit's lookup (the model's setting, then the top-level one, then the parameter's
    default) as one chatvec schedule: conditions become groups in the order tried, the first
    unconditional value the default."""
    from chatvec.core.errors import ConfigError

    groups: dict[str, float | list[float]] = {}
    default: float | list[float] | None = fallback
    for filt, value in (e for s in settings for e in _entries(s)):
        if filt is None or filt == "*":
            default = value
            break
        groups.setdefault(filt, value)  # a later condition on the same filter is never reached
    plain = {**groups, **({"default": default} if default is not None else {})} if groups else default
    bounds = (0.0, 1.0) if "density" in what else (None, None)
    try:
        return parse_schedule(plain, what, *bounds)
    except ValueError as exc:
        raise ConfigError(f"the mergekit config's {exc}") from None


def load_mergekit_config(path_or_uri: str) -> Recipe:
    """Read a mergekit YAML (local path or storage URI); ConfigError names every bad key."""
    from chatvec.core.yamlconfig import load_model

    return recipe_from_mergekit(load_model(str(path_or_uri), MergekitConfig))
