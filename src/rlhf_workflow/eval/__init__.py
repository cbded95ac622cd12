"""Evaluation.

* `reward_eval` — `eval-rm`: a reward or preference model's accuracy on held-out pairs (RewardBench sections)
* `policy`      — a policy's metrics from its scored held-out samples: proxy and gold reward, win rate and KL vs π0
* `stats`       — means, pairwise outcomes with ties, bootstrap intervals, correlation
* `report`      — the Markdown/HTML report of a run directory, with plots
"""
