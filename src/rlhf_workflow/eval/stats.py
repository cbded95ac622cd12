"""Small statistics shared by the evaluations: means, pairwise outcomes with ties, bootstrap
intervals over prompts, a t-interval over seeds, the paired sign-flip test, correlation, the
length-controlled win rate. They take finite numbers only (`_finite`)."""

from __future__ import annotations

import math
import random
from typing import Sequence


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return sum(values) / len(values) if values else None


def pair_outcome(chosen_score: float, rejected_score: float) -> float:
    """1 if chosen is preferred, 0 if rejected is, ½ on a tie."""
    if chosen_score > rejected_score:
        return 1.0
    if chosen_score < rejected_score:
        return 0.0
    return 0.5


def _finite(groups: Sequence[Sequence[float]]) -> None:
    """Refuse NaN and ±inf: a NaN makes every comparison false, so a p-value would come out 0 and
    an interval's ends swapped, with nothing to show that anything went wrong."""
    bad = next((v for g in groups for v in g if not math.isfinite(v)), None)
    if bad is not None:
        raise ValueError(f"a value to summarise is {bad}: only finite numbers can be averaged or tested")


def bootstrap_interval(groups: Sequence[Sequence[float]], resamples: int, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile interval of the mean, resampling whole groups (the samples of one prompt
    together, as they are not independent). None with fewer than two groups or no resamples."""
    _finite(groups)
    groups = [g for g in groups if g]
    if len(groups) < 2 or resamples <= 0:
        return None
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        picked = [groups[rng.randrange(len(groups))] for _ in groups]
        means.append(sum(sum(g) for g in picked) / sum(len(g) for g in picked))
    means.sort()
    return means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's correlation; None with fewer than three points or a constant side."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def sign_flip_pvalue(groups: Sequence[Sequence[float]], resamples: int = 10000, seed: int = 0) -> float | None:
    """Two-sided p-value of a paired permutation test that the mean paired difference is zero.

    ``groups`` hold paired differences (policy − baseline), a prompt's together. Under the null
    hypothesis each group is as likely negated as not (the two policies are exchangeable on each
    prompt), so the statistic |Σ d| is compared with its value under random sign flips of whole
    groups: p = (1 + #{flips with |Σ d*| ≥ |Σ d|}) / (1 + flips). With at most 16 groups every one of
    the 2^k flips is enumerated (p exact, no ``+1``); otherwise ``resamples`` random flips (seeded).
    None with no groups."""
    _finite(groups)
    sums = [sum(g) for g in groups if g]
    if not sums:
        return None
    observed = abs(sum(sums)) - 1e-12 * (1 + sum(abs(s) for s in sums))  # float ties count as at least as large
    if len(sums) <= 16:
        hits = 0
        for mask in range(2 ** len(sums)):
            total = sum(-s if mask >> k & 1 else s for k, s in enumerate(sums))
            hits += abs(total) >= observed
        return hits / 2 ** len(sums)
    rng = random.Random(seed)
    hits = sum(abs(sum(s if rng.random() < 0.5 else -s for s in sums)) >= observed for _ in range(resamples))
    return (1 + hits) / (1 + resamples)


# t quantiles t_{0.975}(df) for df = 1 … 30; beyond, the Cornish-Fisher expansion in z = 1.96,
# z + (z³ + z) / (4 df) + (5z⁵ + 16z³ + 3z) / (96 df²), within 0.0002 of them
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95 % Student-t interval of the mean of independent ``values`` (a recipe's per-seed results):
    mean ± t_{0.975}(k − 1) · s / √k, s the sample standard deviation. None with fewer than three
    values (with two, t(1) = 12.7 says nothing)."""
    _finite([values])
    k = len(values)
    if k < 3:
        return None
    centre = sum(values) / k
    spread = math.sqrt(sum((v - centre) ** 2 for v in values) / (k - 1))
    df = k - 1
    z = 1.96
    quantile = _T975[df - 1] if df <= len(_T975) else \
        z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = quantile * spread / math.sqrt(k)
    return centre - half, centre + half


def fit_length_logistic(outcomes: Sequence[float], length_diffs: Sequence[float], scale: float,
                        ridge: float = 1e-4) -> tuple[float, float]:
    """(a, b) maximising Σ y log p + (1 − y) log(1 − p) − ridge·(a² + b²)/2 with
    p = σ(a + b·tanh(Δ / scale)), by Newton's method.

    ``outcomes`` are y ∈ [0, 1] (1 a win, ½ a tie, 0 a loss: a tie counts as half a win and half a
    loss); ``length_diffs`` are Δ, the length of the response minus the length of the one it was
    compared with. tanh bounds what a very long answer can weigh, as AlpacaEval 2's length-
    controlled win rate does; the small ridge keeps (a, b) finite when lengths separate wins from losses.

    A Newton step that would lower the objective is halved until it does not (the objective is
    strictly concave, so this converges from anywhere); where a full step never overshoots, as on
    every eval measured, the iterates are plain Newton's."""
    import numpy as np

    y = np.asarray(outcomes, dtype=float)
    x = np.tanh(np.asarray(length_diffs, dtype=float) / scale) if scale > 0 else np.zeros(len(y))
    features = np.stack([np.ones_like(x), x], axis=1)

    def objective(t: "np.ndarray") -> float:  # log σ(η) = −softplus(−η), log(1 − σ(η)) = −softplus(η)
        eta = features @ t
        return float(-(y * np.logaddexp(0, -eta) + (1 - y) * np.logaddexp(0, eta)).sum() - ridge * (t @ t) / 2)

    theta = np.zeros(2)
    current = objective(theta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(features @ theta)))
        gradient = features.T @ (y - p) - ridge * theta
        hessian = (features * (p * (1 - p))[:, None]).T @ features + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        value = objective(theta + step)
        while value < current - 1e-12 * abs(current) and np.abs(step).max() > 1e-12:
            step = step / 2
            value = objective(theta + step)
        theta, current = theta + step, value
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_separates(outcomes: Sequence[float], length_diffs: Sequence[float]) -> bool:
    """Whether the length differences separate the wins from the losses, so that the model of
    `fit_length_logistic` has no win rate at equal length: every win at a Δ at least as large as
    every loss's, or at most as small (a tie is half a win and half a loss). The likelihood then
    grows without bound as |b| does, and the prediction at Δ = 0 goes to 0 or 1 (without the ridge
    there is no estimate; with it, the ridge alone decides). Not so where wins and losses meet
    exactly at Δ = 0: the comparisons made there fix the rate at equal length, whatever b does."""
    wins = [d for o, d in zip(outcomes, length_diffs) if o > 0]
    losses = [d for o, d in zip(outcomes, length_diffs) if o < 1]
    if not wins or not losses:
        return False  # all wins or all losses: the intercept runs off, the win rate at equal length is that one
    for low, high in ((max(losses), min(wins)), (max(wins), min(losses))):
        if low < high or low == high != 0:
            return True
    return False


def _no_rate_at_equal_length(outcomes: Sequence[float], length_diffs: Sequence[float]) -> str:
    """Why these comparisons give no win rate at equal length, or "" where they give one."""
    if min(length_diffs) > 0 or max(length_diffs) < 0:
        side = "longer" if min(length_diffs) > 0 else "shorter"
        return (f"every answer is {side} than the one it was compared with (by {min(map(abs, length_diffs)):g} to "
                f"{max(map(abs, length_diffs)):g} tokens): none at or across equal length, where the model "
                "would only extrapolate")
    if length_separates(outcomes, length_diffs):
        return ("the length differences separate the wins from the losses: the model's win rate at equal length "
                "runs off to 0 or 1")
    return ""


def length_controlled_win_rate(groups: Sequence[Sequence[tuple[float, float]]], resamples: int,
                               seed: int = 0) -> tuple[float | None, tuple[float, float] | None, float, str] | None:
    """The win rate at equal length, its 95 % interval, the raw win rate, and a note: why there is
    no win rate at equal length, or no interval, where there is none ("" otherwise).

    ``groups`` hold (outcome, length difference) for the comparisons of one prompt. A logistic model
    of the outcome on tanh(Δ / s), s the standard deviation of Δ (`fit_length_logistic`), says how
    much of the win rate comes with length; the length-controlled win rate is its prediction at
    Δ = 0, σ(a). The interval resamples prompts and refits. Where few comparisons are near equal
    length that prediction is an extrapolation, and the interval is wide.

    The data cannot say it, and the first value is None with the reason
    (`_no_rate_at_equal_length`), when every length difference has one sign (no comparison at or
    across equal length: 8 answers 57-143 tokens longer gave 1.5e-24 for a raw win rate of 0.62) or
    when they separate the wins from the losses (`length_separates`: the slope is then the ridge's;
    a 4-prompt example gave 7e-5 for 0.56). A resample where either holds has no value either; if
    more than 2.5 % of them do, the interval's ends would be theirs, and there is none (the note
    says so). None with no comparisons."""
    pairs = [item for group in groups for item in group]
    if not pairs:
        return None
    outcomes, diffs = [o for o, _ in pairs], [d for _, d in pairs]
    _finite([outcomes, diffs])
    raw = sum(outcomes) / len(outcomes)
    why_not = _no_rate_at_equal_length(outcomes, diffs)
    if why_not:
        return None, None, raw, why_not
    centre = sum(diffs) / len(diffs)
    scale = math.sqrt(sum((d - centre) ** 2 for d in diffs) / len(diffs))
    a, _ = fit_length_logistic(outcomes, diffs, scale)
    groups = [g for g in groups if g]
    if len(groups) < 2 or resamples <= 0:
        return _sigmoid(a), None, raw, ""
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picked = [item for _ in groups for item in groups[rng.randrange(len(groups))]]
        picked_outcomes, picked_diffs = [o for o, _ in picked], [d for _, d in picked]
        if not _no_rate_at_equal_length(picked_outcomes, picked_diffs):
            values.append(_sigmoid(fit_length_logistic(picked_outcomes, picked_diffs, scale)[0]))
    failed = resamples - len(values)
    if failed > 0.025 * resamples:
        return _sigmoid(a), None, raw, (f"no interval: in {failed} of {resamples} resamples of the prompts the lengths "
                                        "leave no win rate at equal length (one-sided or separating)")
    values.sort()
    m = len(values)
    return _sigmoid(a), (values[int(0.025 * (m - 1))], values[int(math.ceil(0.975 * (m - 1)))]), raw, ""


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))
