"""The merge methods, one registry entry each: what the recipe, the kernels, the sweep and the CLI
know.

A new method is one ``METHODS.register`` here plus its arithmetic in merge/compute.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatvec.core.registry import Registry


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    # recipe fields the method reads (every method reads `ratio`)
    parameters: tuple[str, ...]
    # True when an output element depends on the whole tensor (TIES' trim threshold is a
    # statistic of all of it), so the tensor is computed as one job
    whole_tensor: bool
    # True when entries are dropped by the seeded random rule of merge/kernels.py (DARE)
    random_drop: bool
    # True when the method's vectors are combined by TIES' sign election and disjoint mean
    # (merge/compute.py) instead of being added
    sign_election: bool
    # how the kept entries are rescaled, in words (docs/merging.md and --help)
    rescale: str


METHODS: Registry[MergeMethod] = Registry("merge method")
for _method in (
    MergeMethod(
        "add",
        "cp + ratio * tau",
        ("ratio",),
        whole_tensor=False,
        random_drop=False,
        sign_election=False,
        rescale="none",
    ),
    MergeMethod(
        "ties",
        "trim to the top density of |tau|, elect a sign, disjoint mean (Yadav et al. 2023)",
        ("ratio", "density"),
        whole_tensor=True,
        random_drop=False,
        sign_election=True,
        rescale="none",
    ),
    MergeMethod(
        "dare",
        "drop entries at random, keep each with probability density (Yu et al. 2024)",
        ("ratio", "density", "seed"),
        whole_tensor=False,
        random_drop=True,
        sign_election=False,
        rescale="kept entries / density",
    ),
    MergeMethod(
        "dare_ties",
        "dare's random drop and rescale, then ties' sign election and disjoint mean",
        ("ratio", "density", "seed"),
        whole_tensor=False,
        random_drop=True,
        sign_election=True,
        rescale="kept entries / density",
    ),
):
    METHODS.register(_method.name, _method, summary=_method.summary)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS.names())


def drops(term) -> bool:
    """Whether DARE's seeded drop applies to a recipe term (`method`, `density`): it does below
    density 1, where every entry would be kept."""
    return METHODS[term.method].random_drop and term.density < 1.0
