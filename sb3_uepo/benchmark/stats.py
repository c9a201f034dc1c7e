"""Aggregate statistics across seeds: mean ± std, interquartile mean (IQM) and percentile-bootstrap confidence
intervals, following Agarwal et al., "Deep RL at the Edge of the Statistical Precipice" (NeurIPS 2021) and their
``rliable`` library (not a dependency: these few lines are all we need).

Owns: the numbers in the benchmark table. Pure numpy, no files, no environments.

* IQM is the mean of the middle 50% of scores: ``scipy.stats.trim_mean(x, 0.25)``, which drops
  ``floor(0.25 * n)`` scores from each end after sorting (as ``rliable`` computes it). With 3 seeds
  nothing is dropped and IQM equals the mean; from 4 seeds on it ignores the extremes.
* Confidence intervals are percentile bootstrap intervals: resample the runs with replacement, recompute the
  statistic, take the ``alpha/2`` and ``1 - alpha/2`` quantiles. Across several tasks the resampling is
  stratified (runs are resampled within each task, as ``rliable.library.get_interval_estimates`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[[np.ndarray], float]


def trimmed_mean(scores: Sequence[float] | np.ndarray, proportion: float = 0.25) -> float:
    """Mean after dropping ``floor(proportion * n)`` of the sorted scores from each end (``scipy.stats.trim_mean``).

    :param scores: 1-D scores
    :param proportion: share cut from each end, in ``[0, 0.5)``
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size == 0:
        raise ValueError("trimmed_mean of no scores")
    if not 0.0 <= proportion < 0.5:
        raise ValueError(f"proportion must be in [0, 0.5), got {proportion}")
    cut = int(proportion * values.size)
    return float(values[cut : values.size - cut].mean())


def iqm(scores: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of the scores.

    :param scores: 1-D scores (e.g. one normalised score per seed, or all runs of all tasks pooled)
    """
    return trimmed_mean(scores, 0.25)


def mean_std(scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and (population, ``ddof=0``) standard deviation, as SB3's ``evaluate_policy`` reports them.

    :param scores: 1-D scores
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_std of no scores")
    return float(values.mean()), float(values.std())


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray | Sequence[Sequence[float]],
    statistic: Statistic = iqm,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap confidence interval of ``statistic``.

    ``scores`` is either one task's runs (1-D) or a list of per-task runs (stratified bootstrap: each task's runs
    are resampled with replacement separately, then all are pooled and ``statistic`` is applied).

    :param scores: 1-D runs, or a sequence of 1-D per-task runs (tasks may have different numbers of runs)
    :param statistic: function of the pooled 1-D scores (default :func:`iqm`)
    :param n_resamples: bootstrap resamples
    :param confidence: coverage of the interval, e.g. 0.95
    :param seed: seed of the resampling (the table is reproducible)
    :return: ``(estimate, low, high)``; with a single run the interval collapses onto the estimate
    """
    strata = _as_strata(scores)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    pooled = np.concatenate(strata)
    estimate = float(statistic(pooled))
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples, dtype=np.float64)
    for b in range(n_resamples):
        sample = np.concatenate([stratum[rng.integers(0, stratum.size, stratum.size)] for stratum in strata])
        resampled[b] = statistic(sample)
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(low), float(high)


def _as_strata(scores: Sequence[float] | np.ndarray | Sequence[Sequence[float]]) -> list[np.ndarray]:
    if isinstance(scores, np.ndarray) and scores.ndim == 1:
        strata = [scores.astype(np.float64)]
    elif len(scores) > 0 and np.ndim(scores[0]) == 0:  # type: ignore[arg-type]
        strata = [np.asarray(scores, dtype=np.float64)]
    else:
        strata = [np.asarray(s, dtype=np.float64).ravel() for s in scores]  # type: ignore[union-attr]
    strata = [s for s in strata if s.size > 0]
    if not strata:
        raise ValueError("bootstrap_ci of no scores")
    return strata
