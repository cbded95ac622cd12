"""The evaluations' statistics: the paired sign-flip permutation test, checked against exact binomial
and enumeration results worked out by hand; the bootstrap interval against normal theory; the
length model's fit against its own optimality condition."""

from __future__ import annotations

import math
import random

import pytest

from rlhf_workflow.eval.stats import bootstrap_interval, sign_flip_pvalue


def test_sign_flip_is_the_exact_sign_test_for_equal_differences():
    # 10 prompts all +1: only the two flips with every sign equal reach |sum| = 10 -> p = 2 / 2^10
    assert sign_flip_pvalue([[1.0]] * 10) == pytest.approx(2 / 1024)
    # 8 up, 2 down: |sum| >= 6 needs at most 2 or at least 8 ups: 2 * (1 + 10 + 45) / 1024
    assert sign_flip_pvalue([[1.0]] * 8 + [[-1.0]] * 2) == pytest.approx(2 * 56 / 1024)


def test_groups_flip_whole_and_no_difference_gives_one():
    # two prompts with two samples each: the groups' sums 2 and 1 are what is flipped
    assert sign_flip_pvalue([[1.0, 1.0], [0.5, 0.5]]) == pytest.approx(2 / 4)
    assert sign_flip_pvalue([[0.0], [0.0], [0.0]]) == 1.0
    assert sign_flip_pvalue([]) is None and sign_flip_pvalue([[], []]) is None


def test_many_groups_are_sampled_with_a_seed():
    rng = random.Random(1)
    null = [[rng.gauss(0, 1)] for _ in range(200)]
    shifted = [[d[0] + 0.5] for d in null]
    p_null = sign_flip_pvalue(null, resamples=2000)
    assert p_null == sign_flip_pvalue(null, resamples=2000) and 0.05 < p_null <= 1
    p_shift = sign_flip_pvalue(shifted, resamples=2000)
    assert p_shift == pytest.approx(1 / 2001)  # no random flip reaches a shift of 0.5 over 200 prompts
    # the normal approximation agrees on a moderate effect
    moderate = [[d[0] + 0.15] for d in null]
    z = sum(d[0] for d in moderate) / math.sqrt(sum(d[0] ** 2 for d in moderate))
    normal_p = math.erfc(abs(z) / math.sqrt(2))
    assert sign_flip_pvalue(moderate, resamples=20000) == pytest.approx(normal_p, abs=0.02)


def test_bootstrap_interval_covers_the_mean_and_resamples_groups():
    groups = [[float(k % 5)] for k in range(50)]
    low, high = bootstrap_interval(groups, 500)
    assert low < 2.0 < high
    assert bootstrap_interval([[1.0]], 500) is None


def test_bootstrap_interval_against_the_normal_theory_one_and_with_whole_groups():
    """400 draws of N(0, 1): the percentile interval is the mean ± 1.96·s/√n to within a few per
    cent. A prompt whose two samples are the same value counts once: twins resampled as a group give
    exactly the interval of the single values (resampled apart they would narrow it by √2)."""
    rng = random.Random(3)
    values = [rng.gauss(0, 1) for _ in range(400)]
    n, centre = len(values), sum(values) / len(values)
    s = math.sqrt(sum((v - centre) ** 2 for v in values) / (n - 1))
    low, high = bootstrap_interval([[v] for v in values], 4000)
    assert (low + high) / 2 == pytest.approx(centre, abs=0.01)
    assert (high - low) / 2 == pytest.approx(1.96 * s / math.sqrt(n), rel=0.06)
    assert bootstrap_interval([[v, v] for v in values], 4000) == pytest.approx((low, high))


def test_the_length_fit_is_the_maximum_of_its_objective():
    """On random judgements, separated or nearly so included: the returned (a, b) zero the gradient of
    the ridge-penalised log-likelihood, which is strictly concave, so it is the maximum."""
    import numpy as np

    from rlhf_workflow.eval.stats import fit_length_logistic

    rng = random.Random(4)
    for _ in range(200):
        n = rng.randint(3, 40)
        diffs = [rng.gauss(rng.uniform(-30, 30), rng.uniform(1, 20)) for _ in range(n)]
        slope, level = rng.uniform(-8, 8), rng.uniform(-3, 3)
        scale = float(np.std(diffs))
        outcomes = [rng.choice([0.0, 0.5, 1.0]) if rng.random() < 0.1 else
                    float(rng.random() < 1 / (1 + math.exp(-(level + slope * math.tanh(d / scale))))) for d in diffs]
        a, b = fit_length_logistic(outcomes, diffs, scale, ridge=1e-2)
        x = np.tanh(np.asarray(diffs) / scale)
        p = 1 / (1 + np.exp(-(a + b * x)))
        y = np.asarray(outcomes)
        gradient = [float(np.sum(y - p) - 1e-2 * a), float(np.sum((y - p) * x) - 1e-2 * b)]
        assert gradient == pytest.approx([0.0, 0.0], abs=1e-6)
