"""Ranking n responses of one prompt with pairwise comparisons (a preference model, or any judge).

The comparison is given as ``prefer(ordered_pairs) -> [P(first ≻ second)]``: one model call per
ordered pair, batched. Every comparison here asks for both orders and averages them,

    p(i ≻ j) = ½ [ prefer(i, j) + 1 − prefer(j, i) ],

so a position-biased judge cannot decide a match by where the responses were put.

- `knockout`: a single-elimination bracket finds the best with n − 1 comparisons; the first
  round's losers (and a first-round bye) play a second bracket in which the *less* preferred
  response advances, finding the worst with ⌈n/2⌉ − 1 more. The best never enters that second
  bracket: with odd n the bye played no first-round match and can win the first bracket, and a
  judge that is not transitive (a ≻ b ≻ c ≻ a) could then also make it lose the second one, so
  that one response would be both best and worst (when the bye is the best, one comparison
  fewer). Scores: best 1, worst 0, others ½ (a knockout orders nothing else reliably).
- `round_robin`: all n(n − 1)/2 pairs. Scores: Copeland (wins − losses, a win being p > ½, a
  tie ½ each) or Borda (the sum of preference probabilities), scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
Prefer = Callable[[Sequence[tuple[int, int]]], Sequence[float]]


@dataclass
class Ranking:
    best: int
    worst: int
    scores: list[float]
    comparisons: int  # unordered comparisons (each asked in both orders)


def both_orders(forward: Sequence[float], backward: Sequence[float]) -> list[float]:
    """p(a ≻ b) = ½ [P(a first ≻ b) + 1 − P(b first ≻ a)] for each comparison asked in both orders."""
    return [0.5 * (p + 1.0 - q) for p, q in zip(forward, backward)]


def compare_both_orders(prefer: Callable[[Sequence[tuple[T, T]]], Sequence[float]], pairs: Sequence[tuple[T, T]]) -> list[float]:
    """p(i ≻ j) for each (i, j), from one batched call with both orders."""
    if not pairs:
        return []
    probs = list(prefer(list(pairs) + [(j, i) for i, j in pairs]))
    return both_orders(probs[: len(pairs)], probs[len(pairs) :])


def _bracket(entrants: list[int], prefer: Prefer, *, keep_winner: bool) -> tuple[int, list[int], int]:
    """Single elimination. Returns (champion, first-round losers incl. a bye, comparisons).

    With ``keep_winner`` the preferred response of each match advances; without it the less
    preferred one does (a bracket for the worst). Each round is one batched call.
    """
    comparisons = 0
    first_round_out: list[int] | None = None
    alive = list(entrants)
    while len(alive) > 1:
        pairs = [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
        bye = [alive[-1]] if len(alive) % 2 else []
        probs = compare_both_orders(prefer, pairs)
        comparisons += len(pairs)
        advancing, out = [], []
        for (i, j), p in zip(pairs, probs):
            i_wins = p >= 0.5  # a tie goes to the earlier entrant, deterministically
            win, lose = (i, j) if i_wins else (j, i)
            advancing.append(win if keep_winner else lose)
            out.append(lose if keep_winner else win)
        if first_round_out is None:
            first_round_out = out + bye
        alive = advancing + bye
    return alive[0], first_round_out or [], comparisons


def worst_candidates(first_round_out: list[int], best: int) -> list[int]:
    """Who plays the bracket for the worst: the first round's losers and its bye, less the best (the
    bye when it went on to win; see the module docstring). Never empty when n >= 2: the first round
    has at least one loser, and a loser is never the best."""
    return [k for k in first_round_out if k != best]


def knockout(n: int, prefer: Prefer) -> Ranking:
    """Best by a knockout bracket (n − 1 comparisons), worst by a second bracket of its first-round
    losers (and bye) other than the best; best != worst whenever n >= 2, transitive judge or not."""
    if n < 1:
        raise ValueError("nothing to rank")
    if n == 1:
        return Ranking(0, 0, [0.5], 0)
    best, first_round_out, used = _bracket(list(range(n)), prefer, keep_winner=True)
    worst, _, more = _bracket(worst_candidates(first_round_out, best), prefer, keep_winner=False)
    scores = [0.5] * n
    scores[best], scores[worst] = 1.0, 0.0
    return Ranking(best, worst, scores, used + more)


def round_robin(n: int, prefer: Prefer, *, method: str = "copeland") -> Ranking:
    """Every pair once (in both orders); Copeland or Borda scores scaled to [0, 1]."""
    if n < 1:
        raise ValueError("nothing to rank")
    if method not in ("copeland", "borda"):
        raise ValueError(f"unknown round-robin method {method!r}")
    if n == 1:
        return Ranking(0, 0, [0.5], 0)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    probs = compare_both_orders(prefer, pairs)
    raw = [0.0] * n
    for (i, j), p in zip(pairs, probs):
        if method == "borda":
            raw[i] += p
            raw[j] += 1.0 - p
        else:
            win_i = 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5
            raw[i] += win_i
            raw[j] += 1.0 - win_i
    scores = [value / (n - 1) for value in raw]  # fraction of the n − 1 games won
    best = max(range(n), key=lambda k: (scores[k], -k))
    worst = min(range(n), key=lambda k: (scores[k], k))
    return Ranking(best, worst, scores, len(pairs))
