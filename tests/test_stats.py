"""The evaluations' statistics: the paired sign-flip permutation test, checked against exact binomial
and enumeration results worked out by hand."""

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
