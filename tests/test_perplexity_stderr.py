"""The perplexity cell's standard error, against values worked out by hand.

Three texts with (NLL in nats, tokens, UTF-8 bytes) = (12, 4, 30), (6, 3, 20), (20, 8, 50).
Per token: R = 38 / 15; residuals y_i - R x_i = 28/15, -24/15, -4/15; the ratio estimator's
variance is n / (n - 1) * sum(residual^2) / total^2 = 3/2 * (1376/225) / 15^2, so
se(R) = sqrt(4128 / 101250) = 0.2019167 nats per token, and the perplexity exp(R) = 12.59542 has
se exp(R) * se(R) = 2.543226 (delta method).
Per byte: R = 0.38; residuals 0.6, -1.6, 1.0; variance 3/2 * 3.92 / 100^2 = 0.000588;
se = 0.0242487 nats = 0.0349835 bits per byte; bits per byte 0.38 / ln 2 = 0.5482241.
"""

from __future__ import annotations

import json
import math

import pytest

from chatvec.eval.kinds.perplexity import PerplexityKind

PARTS = [(12.0, 4, 30), (6.0, 3, 20), (20.0, 8, 50)]


def rows():
    return [
        {"score": math.exp(nll / t), "details": json.dumps({"nll": nll, "tokens": t, "bytes": b})}
        for nll, t, b in PARTS
    ]


def test_perplexity_stderr_by_hand():
    value, se, n = PerplexityKind().aggregate("perplexity", rows())
    assert n == 3
    assert value == pytest.approx(12.595421, rel=1e-6)  # exp(38 / 15)
    assert se == pytest.approx(2.543226, rel=1e-6)


def test_bits_per_byte_stderr_by_hand():
    value, se, n = PerplexityKind().aggregate("bits_per_byte", rows())
    assert n == 3
    assert value == pytest.approx(0.5482241, rel=1e-6)
    assert se == pytest.approx(0.0349835, rel=1e-5)


def test_one_text_has_no_stderr_and_unscored_texts_are_left_out():
    one = rows()[:1] + [{"score": None, "details": json.dumps({"nll": 99.0, "tokens": 0, "bytes": 0})}]
    value, se, n = PerplexityKind().aggregate("perplexity", one)
    assert (value, se, n) == (pytest.approx(math.exp(3.0)), None, 1)
