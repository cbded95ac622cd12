"""The online loop's data stages after generation.

* `judges`   — reward model, preference model (ranking) and Python-function judges
* `annotate` — the `annotate` command: a reward for every response (length penalty optional)
* `pairs`    — the `pairs` command: best-vs-worst (and other) pair selection with statistics
"""
