"""The online iterative loop and the commands it runs after generation.

* `judges`   — reward model, preference model (ranking) and Python-function judges
* `annotate` — the `annotate` command: a reward for every response (length penalty optional)
* `pairs`    — the `pairs` command: best-vs-worst (and other) pair selection with statistics
* `feedback` — simulated human feedback: a gold judge labels π0's samples, a reward model learns them
* `loop`     — the `run` command's run directory: the iterations, the offline baseline, resume
"""
