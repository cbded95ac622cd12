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


def _tournament(beats):
    """A deterministic judge from a set of (winner, loser) pairs: P(first ≻ second) is 1 or 0."""
    def prefer(ordered):
        return [1.0 if (i, j) in beats else 0.0 for i, j in ordered]

    return prefer


def _cycle(n, order):
    """Of n responses, each of ``order`` beats the next and the last beats the first; other pairs by index
    (lower wins)."""
    beats = {(order[k], order[(k + 1) % len(order)]) for k in range(len(order))}
    for i in range(n):
        for j in range(n):
            if i < j and (i, j) not in beats and (j, i) not in beats:
                beats.add((i, j))
    return beats


@pytest.mark.parametrize("n", [3, 5, 7])
def test_knockout_best_is_never_the_worst_for_a_non_transitive_judge(n):
    """The first round's bye can win the best bracket against a judge with cycles; it must not then also
    be the worst. a ≻ b ≻ c ≻ a (the bye c beats the winner a, and loses to b in the worst bracket), a
    cycle through all n, and random tournaments (every pair oriented by a coin)."""
    judges = [_cycle(n, [0, 1, 2]), _cycle(n, [n - 1, 0, 1]), _cycle(n, list(range(n))),
              _cycle(n, list(reversed(range(n))))]
    rng = random.Random(n)
    for _ in range(300):
        judges.append({(i, j) if rng.random() < 0.5 else (j, i) for i in range(n) for j in range(i + 1, n)})
    bye_won = 0
    for beats in judges:
        ranking = knockout(n, _tournament(beats))
        assert ranking.best != ranking.worst, sorted(beats)
        assert ranking.scores[ranking.best] == 1.0 and ranking.scores[ranking.worst] == 0.0
        bye_won += ranking.best == n - 1
    assert bye_won > 0  # the case under test occurred


def test_knockout_rock_paper_scissors():
    """a ≻ b, b ≻ c, c ≻ a: a beats b, the bye c beats a (best); the worst comes from the rest: b."""
    ranking = knockout(3, _tournament({(0, 1), (1, 2), (2, 0)}))
    assert (ranking.best, ranking.worst, ranking.scores) == (2, 1, [0.5, 0.0, 1.0])
    assert ranking.comparisons == 2  # the worst bracket had one entrant left


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
