"""Paired comparisons: McNemar's exact test and the paired bootstrap against hand-computed values."""

from __future__ import annotations

import math
import random
import re

import pytest

from chatvec.eval.paired import (
    PairedDiff,
    bootstrap_interval,
    compare_models,
    format_diff,
    mcnemar_exact,
    paired_difference,
    same_items,
)


@pytest.mark.parametrize(
    "b_better, a_better, p",
    [
        (8, 2, 2 * (1 + 10 + 45) / 1024),  # 2 * P(X <= 2), X ~ Binomial(10, 1/2)
        (0, 5, 2 / 32),
        (5, 0, 2 / 32),
        (3, 3, 1.0),
        (0, 0, 1.0),
        (1, 0, 1.0),
        (12, 1, 2 * (1 + 13) / 2**13),
    ],
)
def test_mcnemar_exact_by_hand(b_better, a_better, p):
    assert mcnemar_exact(b_better, a_better) == pytest.approx(p, rel=1e-12)


def test_mcnemar_on_aligned_01_scores():
    # 6 items both right, 2 both wrong, B right / A wrong on 7, A right / B wrong on 1
    a = [1] * 6 + [0] * 2 + [0] * 7 + [1]
    b = [1] * 6 + [0] * 2 + [1] * 7 + [0]
    d = paired_difference("exact_match", a, b)
    assert d.discordant == (7, 1) and d.n == 16
    assert d.p_mcnemar == pytest.approx(2 * (1 + 8) / 256)
    assert d.diff == pytest.approx(6 / 16) and d.mean_a == pytest.approx(7 / 16) and d.mean_b == pytest.approx(13 / 16)


def test_bootstrap_is_seeded_and_centred_on_the_mean_difference():
    rng = random.Random(1)
    diffs = [rng.gauss(0.3, 1.0) for _ in range(200)]
    lo, hi = bootstrap_interval(diffs, seed=0)
    assert (lo, hi) == bootstrap_interval(diffs, seed=0)
    assert bootstrap_interval(diffs, seed=1) != (lo, hi)
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    # the percentile interval of a mean of 200 is close to the normal one: mean +- 1.96 sd / sqrt(n)
    half = 1.96 * sd / math.sqrt(len(diffs))
    assert lo < mean < hi
    assert lo == pytest.approx(mean - half, abs=0.25 * half) and hi == pytest.approx(mean + half, abs=0.25 * half)
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_pairing_removes_the_item_difficulty_the_unpaired_interval_carries():
    # items differ a lot in difficulty; B is a little better than A on every item
    rng = random.Random(7)
    difficulty = [rng.uniform(0, 10) for _ in range(150)]
    a = [x + rng.gauss(0, 0.3) for x in difficulty]
    b = [x + 0.4 + rng.gauss(0, 0.3) for x in difficulty]
    d = paired_difference("judge_score", a, b)
    assert d.p_mcnemar is None and d.discordant is None  # not a 0/1 metric
    assert d.excludes_zero and d.lo > 0
    assert d.unpaired_lo < 0 < d.unpaired_hi  # the unpaired rule cannot tell
    assert d.width < d.unpaired_width / 5


def rows(model_scores: dict[str, float | None], metric="exact_match", language="ko", benchmark="b"):
    return [
        {"item_id": i, "score": s, "metric": metric, "language": language, "benchmark": benchmark}
        for i, s in model_scores.items()
    ]


def test_compare_models_pairs_by_item_and_counts_what_it_leaves_out():
    a = rows({"1": 1.0, "2": 0.0, "3": 0.0, "4": None, "5": 1.0}) + rows({"1": 3.0, "2": 5.0}, metric="judge_score")
    b = rows({"5": 1.0, "3": 1.0, "2": 1.0, "1": 1.0, "4": 1.0, "6": 0.0}) + rows(
        {"2": 6.0, "1": 7.0}, metric="judge_score"
    )
    out = compare_models(a, b)
    em = out[("ko", "b", "exact_match")]
    assert em.n == 4 and em.n_only == 2  # item 4 unscored for A, item 6 only in B
    assert em.diff == pytest.approx(0.5) and em.discordant == (2, 0)
    js = out[("ko", "b", "judge_score")]
    assert js.n == 2 and js.diff == pytest.approx(2.5)  # (7-3 + 6-5) / 2, paired by item id, not position
    assert not same_items(a, b)
    assert same_items(a, [dict(r) for r in a])


def test_format_and_empty():
    d = paired_difference("m", [0, 0, 0, 0, 1], [1, 1, 1, 1, 1])
    assert d.excludes_zero and format_diff(d).endswith("*") and "p=" in format_diff(d)
    empty = paired_difference("m", [], [])
    assert isinstance(empty, PairedDiff) and empty.diff is None and not empty.excludes_zero
    assert format_diff(empty) == "–"
    with pytest.raises(ValueError):
        paired_difference("m", [1.0], [1.0, 0.0])


# -- two runs of the same model -------------------------------------------------------------------
def _summary(rows_by_cell: dict[tuple, dict[str, float]]):
    import datetime as dt

    from chatvec.eval.kinds.base import mean_stderr
    from chatvec.eval.schema import summary_table

    out = []
    for (model, lang, bench, metric), items in rows_by_cell.items():
        mean, se, n = mean_stderr(list(items.values()))
        out.append(
            dict(
                run_id="r",
                model=model,
                language=lang,
                benchmark=bench,
                kind="chat",
                metric=metric,
                value=mean,
                stderr=se,
                n=n,
                n_unscored=0,
                schema_version=1,
                created_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
            )
        )
    return summary_table(out)


def _samples(rows_by_cell):
    return [
        {"model": m, "language": lang, "benchmark": b, "metric": metric, "kind": "chat", "item_id": i, "score": s}
        for (m, lang, b, metric), items in rows_by_cell.items()
        for i, s in items.items()
    ]


def test_nightly_check_pairs_cells_with_the_same_items_and_keeps_the_unpaired_rule_elsewhere():
    from chatvec.eval.history import compare
    from chatvec.eval.paired import pair_changes, paired_table_text

    rng = random.Random(3)
    difficulty = {str(i): rng.uniform(1, 9) for i in range(60)}
    before = {
        ("m", "ko", "chat", "judge_score"): {i: d for i, d in difficulty.items()},
        ("m", "ko", "other", "judge_score"): {i: d for i, d in difficulty.items()},
    }
    # tonight: every answer of "chat" lost 0.3 points: invisible to the unpaired rule
    after = {
        ("m", "ko", "chat", "judge_score"): {i: d - 0.3 + rng.gauss(0, 0.2) for i, d in difficulty.items()},
        # "other" scored a different set of items tonight: it cannot be paired
        ("m", "ko", "other", "judge_score"): {i: d - 0.3 for i, d in list(difficulty.items())[:50]},
    }
    changes = compare(_summary(before), _summary(after), k=2.0)
    unpaired = {c.benchmark: c for c in changes}
    assert not unpaired["chat"].regression and not unpaired["other"].regression
    check = pair_changes(changes, _samples(before), _samples(after), k=2.0)
    paired = {c.benchmark: c for c in check.changes}
    assert paired["chat"].regression and paired["chat"].delta == pytest.approx(-0.3, abs=0.1)
    assert paired["chat"].threshold < 0.3 < unpaired["chat"].threshold
    assert paired["other"] == unpaired["other"]  # the unpaired rule stays
    assert list(check.paired) == [("m", "ko", "chat", "judge_score")]
    text = paired_table_text(check, "n1", "n2")
    assert "chat" in text and f"{paired['chat'].delta:+.3f}" in text and "*" in text
    # min_delta still applies to paired cells
    assert not {
        c.benchmark: c for c in pair_changes(changes, _samples(before), _samples(after), min_delta=0.5).changes
    }["chat"].regression


def test_the_report_says_which_regressions_were_decided_item_by_item(tmp_path):
    from chatvec.eval.history import compare
    from chatvec.eval.paired import pair_changes
    from chatvec.eval.report import write_report

    rng = random.Random(5)
    base = {str(i): rng.uniform(1, 9) for i in range(40)}
    before = {("m", "ko", "chat", "judge_score"): dict(base), ("m", "ko", "other", "judge_score"): dict(base)}
    after = {
        ("m", "ko", "chat", "judge_score"): {i: v - 0.5 + rng.gauss(0, 0.1) for i, v in base.items()},
        ("m", "ko", "other", "judge_score"): {i: v for i, v in list(base.items())[:30]},
    }
    check = pair_changes(compare(_summary(before), _summary(after)), _samples(before), _samples(after))
    uri = write_report(
        str(tmp_path),
        run_id="n2",
        summary=_summary(after),
        changes=check.changes,
        previous_run="n1",
        paired_changes=check.paired,
    )
    page = open(uri, encoding="utf-8").read()
    regs = page[page.index("<h2>Regressions</h2>") : page.index("<details>")]
    assert "1 regression(s)" in regs and "<td>chat</td>" in regs and "<td>paired</td>" in regs
    assert "<td>other</td>" not in regs
    assert re.search(r"<td>other</td>.*?<td>k x se</td>", page)
