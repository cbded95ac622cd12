"""Ranking responses with pairwise comparisons (models/ranking.py): knockout brackets, round robin
(Copeland, Borda), and asking every comparison in both orders to cancel a position bias."""

from __future__ import annotations

import math
import random

import pytest

from rlhf_workflow.models.ranking import compare_both_orders, knockout, round_robin


def _recording(values):
    calls = []

    def prefer(ordered):
        calls.extend(ordered)
        return [1.0 if values[i] > values[j] else 0.0 for i, j in ordered]

    return prefer, calls


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9])
def test_knockout_finds_best_and_worst_with_n_minus_one_comparisons_for_the_best(n):
    values = random.Random(n).sample(range(100), n)
    prefer, calls = _recording(values)
    ranking = knockout(n, prefer)
    assert values[ranking.best] == max(values) and values[ranking.worst] == min(values)
    best_bracket = n - 1
    worst_bracket = max(math.ceil(n / 2) - 1, 0) if n > 1 else 0
    assert ranking.comparisons == best_bracket + worst_bracket
    assert len(calls) == 2 * ranking.comparisons
    assert {(j, i) for i, j in calls} == set(calls)  # every comparison asked in both orders


@pytest.mark.parametrize("method", ["copeland", "borda"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_round_robin_uses_every_pair_in_both_orders(n, method):
    values = random.Random(10 + n).sample(range(100), n)
    prefer, calls = _recording(values)
    ranking = round_robin(n, prefer, method=method)
    assert ranking.comparisons == n * (n - 1) // 2 and len(calls) == n * (n - 1)
    assert values[ranking.best] == max(values) and values[ranking.worst] == min(values)
    order = sorted(range(n), key=lambda k: values[k])
    assert [ranking.scores[k] for k in order] == sorted(ranking.scores)


def test_both_orders_cancel_a_position_bias():
    values = [3.0, 1.0]

    def biased(ordered):  # the true preference plus +0.3 for whatever is shown first
        return [min(1.0, 1 / (1 + math.exp(values[j] - values[i])) + 0.3) * 0.7 + 0.15 for i, j in ordered]

    unbiased_p = compare_both_orders(biased, [(0, 1), (1, 0)])
    assert unbiased_p[0] > 0.5 > unbiased_p[1] and unbiased_p[0] + unbiased_p[1] == pytest.approx(1.0)
