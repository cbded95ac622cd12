"""The report of a run directory: a Markdown table, PNG plots and an HTML page with the same content.

    rlhf-workflow report runs/online

Reads only files (``metrics.jsonl``, ``state.json``, ``config.yaml``, ``iter_*/pairs.jsonl`` and
each policy's ``eval/`` files), so it works on a run that is still going or was copied from another
machine. Writes ``RUN/report/report.md``, ``report.html`` and the plots: proxy reward, gold metric,
win rate vs π0, KL to π0 and response length against iteration (the offline baseline as a separate
marker), the rewards of chosen vs rejected responses of each iteration's pairs, the gold score by
response length, and the paired differences of `eval.compare` (every policy vs π0, the last
iterate vs offline).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from rlhf_workflow.data.io import iter_jsonl
from rlhf_workflow.data.run_layout import PolicyFiles, RunLayout
from rlhf_workflow.errors import UserError
from rlhf_workflow.eval.compare import html_parts as compare_html
from rlhf_workflow.eval.compare import markdown_lines as compare_markdown
from rlhf_workflow.eval.compare import plot as compare_plot
from rlhf_workflow.eval.render import html_image, html_page, html_table, markdown_table

logger = logging.getLogger(__name__)

CURVES = [  # (metric, axis label)
    ("proxy_reward", "proxy reward (judge)"),
    ("gold", "gold metric"),
    ("win_rate_vs_initial", "win rate vs π0"),
    ("kl_vs_initial", "KL(π_t ‖ π0), nats"),
    ("length_tokens", "response length (tokens)"),
]
COLUMNS = [("id", "policy"), ("proxy_reward", "proxy reward"), ("gold", "gold"), ("gold_gain_vs_initial", "gold gain vs π0"),
           ("win_rate_vs_initial", "win rate vs π0"), ("lc_win_rate_vs_initial", "length-controlled win rate vs π0"),
           ("kl_vs_initial", "KL to π0"), ("length_tokens", "length (tokens)"), ("pairs", "pairs trained")]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_dir).metrics
    if not path.exists():
        raise UserError(f"{run_dir} has no metrics.jsonl: not a run directory, or no policy evaluated yet")
    return [row for _, row in iter_jsonl(path)]


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, float):
        interval = row.get(f"{key}_ci95")
        text = f"{value:.3f}"
        return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per evaluated policy (95 % bootstrap intervals in brackets)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


IFEVAL_COLUMNS = [("ifeval_prompt_strict", "prompt-level strict"), ("ifeval_prompt_loose", "prompt-level loose"),
                  ("ifeval_instruction_strict", "instruction-level strict"),
                  ("ifeval_instruction_loose", "instruction-level loose")]


def ifeval_tables(rows: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, cells)`` of IFEval's four numbers per policy and of the strict rate per
    instruction type per policy (with the number of instructions of that type); none for a run whose
    eval prompts are not IFEval-format."""
    scored = [r for r in rows if r.get("ifeval_prompt_strict") is not None]
    if not scored:
        return []
    four = ("IFEval, by Google's instruction checkers (95 % intervals over prompts)",
            ["policy"] + [title for _, title in IFEVAL_COLUMNS],
            [[str(r["id"])] + [_cell(r, key) for key, _ in IFEVAL_COLUMNS] for r in scored])
    types = sorted({t for r in scored for t in (r.get("ifeval_types") or {})})
    cells = []
    for name in types:
        counts = {(r.get("ifeval_types") or {}).get(name, {}).get("n") for r in scored} - {None}
        line = [name, "/".join(str(c) for c in sorted(counts))]
        for r in scored:
            entry = (r.get("ifeval_types") or {}).get(name)
            line.append("–" if entry is None else f"{entry['strict']:.2f}")
        cells.append(line)
    per_type = ("IFEval: share of instructions followed (strict), per instruction type",
                ["instruction type", "instructions"] + [str(r["id"]) for r in scored], cells)
    return [four, per_type]


def _plot_ifeval_types(rows: list[dict[str, Any]], out: Path) -> tuple[str, str] | None:
    """The strict rate per IFEval instruction type, one bar per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get("ifeval_types")]
    if not scored:
        return None
    types = sorted({t for r in scored for t in r["ifeval_types"]})
    height = 0.8 / len(scored)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(types) * max(len(scored), 2) / 2 + 1.2), dpi=110)
    for k, r in enumerate(scored):
        values = [r["ifeval_types"].get(t, {}).get("strict", 0.0) for t in types]
        ax.barh([i + k * height for i in range(len(types))], values, height=height, label=str(r["id"]))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(types))])
    ax.set_yticklabels(types, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of instructions followed (strict)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ifeval_types.png")
    plt.close(fig)
    return "ifeval_types.png", "IFEval: instructions followed per type (strict), per policy"


def _plot_curves(rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    online = [r for r in rows if r.get("mode") != "offline" and r.get("iteration") is not None]
    online.sort(key=lambda r: r["iteration"])
    offline = [r for r in rows if r.get("mode") == "offline"]
    made = []
    for key, label in CURVES:
        points = [(r["iteration"], r[key], r.get(f"{key}_ci95")) for r in online if r.get(key) is not None]
        off = [r for r in offline if r.get(key) is not None]
        if not points and not off:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        if points:
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o", label="online")
            lows = [p[2][0] if p[2] else p[1] for p in points]
            highs = [p[2][1] if p[2] else p[1] for p in points]
            ax.fill_between(xs, lows, highs, alpha=0.2)
            ax.set_xticks(xs)
        last = max((p[0] for p in points), default=1)
        for r in off:
            err = r.get(f"{key}_ci95")
            yerr = [[r[key] - err[0]], [err[1] - r[key]]] if err else None
            ax.errorbar([last], [r[key]], yerr=yerr, marker="s", color="tab:red", capsize=3, label="offline (same pairs)")
        name = f"{key}.png"
        _finish_plot(fig, ax, out / name, "iteration (0 = π0)", label)
        made.append((name, label))
    return made


def _plot_proxy_vs_gold(rows: list[dict[str, Any]], out: Path) -> tuple[str, str] | None:
    """Gold against proxy reward, one point per policy: if the proxy keeps rising while the gold
    score stalls or falls, the policy is over-optimising the proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("proxy_reward") is not None and r.get("gold") is not None]
    if len(points) < 2:
        return None
    online = sorted((r for r in points if r.get("mode") != "offline"), key=lambda r: r.get("iteration") or 0)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    if online:
        ax.plot([r["proxy_reward"] for r in online], [r["gold"] for r in online], marker="o", label="online")
    for r in points:
        if r.get("mode") == "offline":
            ax.plot([r["proxy_reward"]], [r["gold"]], marker="s", color="tab:red", linestyle="", label="offline")
        ax.annotate(r["id"], (r["proxy_reward"], r["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _finish_plot(fig, ax, out / "proxy_vs_gold.png", "proxy reward (judge)", "gold metric")
    return "proxy_vs_gold.png", "gold metric against proxy reward (over-optimisation shows as proxy up, gold flat)"


def _plot_pair_rewards(run_dir: Path, out: Path) -> tuple[str, str] | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = RunLayout(run_dir)
    files = [policy.pairs for policy in (*layout.iterations(), layout.offline) if policy.pairs.exists()]
    if not files:
        return None
    fig, axes = plt.subplots(1, len(files), figsize=(3.2 * len(files), 3), dpi=110, squeeze=False)
    for ax, path in zip(axes[0], files):
        rows = [row for _, row in iter_jsonl(path, allow_empty=True)]
        chosen = [r["chosen_reward"] for r in rows if r.get("chosen_reward") is not None]
        rejected = [r["rejected_reward"] for r in rows if r.get("rejected_reward") is not None]
        values = chosen + rejected
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        bins = [low + (high - low) * k / 20 for k in range(21)]  # the same bins for both, so heights compare
        ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
        ax.hist(chosen, bins=bins, alpha=0.6, label="chosen")
        ax.set_title(f"{path.parent.name}: {len(rows)} pairs", fontsize=9)
        ax.set_xlabel("reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pair_rewards.png")
    plt.close(fig)
    return "pair_rewards.png", "rewards of chosen vs rejected responses in each iteration's pairs"


def paired_comparisons(run_dir: Path, resamples: int = 1000) -> list[Any]:
    """`eval.compare` within the run: every policy against π0, and the last online iterate against
    the offline baseline when there is one. Empty when fewer than two policies were evaluated."""
    from rlhf_workflow.eval.compare import compare, load, policy_dirs

    if not RunLayout(run_dir).config.exists() or not policy_dirs(run_dir):
        return []
    policies = load([str(run_dir)])
    labels = list(dict.fromkeys(p.label for p in policies))
    recipe = policies[0].recipe
    initial = f"{recipe}/iter_0"
    wanted = [(label, initial) for label in labels if label != initial] if initial in labels else []
    online = [label for label in labels if label.split("/", 1)[1].startswith("iter_") and label != initial]
    if online and f"{recipe}/offline" in labels:
        wanted.append((online[-1], f"{recipe}/offline"))
    return compare(policies, wanted, resamples) if wanted else []


LENGTH_BINS = 5


def gold_by_length(run_dir: Path) -> tuple[list[str], dict[str, list[tuple[float | None, int]]]] | None:
    """(bin labels, policy -> [(mean gold score, responses)] per bin): each policy's gold score in bins
    of response length (tokens), the bins the quintiles of every evaluated response's length. None
    without gold scores."""
    from rlhf_workflow.data.io import iter_jsonl
    from rlhf_workflow.eval.compare import policy_dirs
    samples: dict[str, list[tuple[int, float]]] = {}
    for policy in policy_dirs(run_dir):
        files = PolicyFiles(policy).eval
        if not files.gold.exists():
            continue
        gold = {row["id"]: row.get("gold") or [] for _, row in iter_jsonl(files.gold)}
        for _, row in iter_jsonl(files.scored):
            for tokens, score in zip(row.get("response_tokens") or [], gold.get(row["id"], [])):
                if isinstance(tokens, int) and isinstance(score, (int, float)):
                    samples.setdefault(policy.name, []).append((tokens, float(score)))
    lengths = sorted(t for values in samples.values() for t, _ in values)
    if not lengths:
        return None
    edges = sorted({lengths[min(len(lengths) - 1, k * len(lengths) // LENGTH_BINS)] for k in range(1, LENGTH_BINS)})
    bounds = list(zip([lengths[0]] + edges, edges + [lengths[-1] + 1]))
    labels = [f"{low}–{high - 1}" for low, high in bounds]
    binned = {}
    for name, values in samples.items():
        binned[name] = []
        for low, high in bounds:
            inside = [score for tokens, score in values if low <= tokens < high]
            binned[name].append((sum(inside) / len(inside) if inside else None, len(inside)))
    return labels, binned


def gold_by_length_table(labels: list[str], binned: dict[str, list[tuple[float | None, int]]]) -> tuple[list[str], list[list[str]]]:
    cells = [[label] + ["–" if values[k][0] is None else f"{values[k][0]:.3f} ({values[k][1]})"
                        for values in binned.values()] for k, label in enumerate(labels)]
    return ["response tokens"] + list(binned), cells


def _finish_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, legend_size: int = 8) -> None:
    """Axis labels, grid and legend; save and close."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_gold_by_length(labels: list[str], binned: dict[str, list[tuple[float | None, int]]], out: Path) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    for name, values in binned.items():
        points = [(k, mean_gold) for k, (mean_gold, _) in enumerate(values) if mean_gold is not None]
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    _finish_plot(fig, ax, out / "gold_by_length.png", "response length (tokens)", "mean gold score", legend_size=7)
    return "gold_by_length.png", "gold score by response length (does the gain come with length?)"


def made_by_lines(state: dict[str, Any]) -> list[str]:
    """What made the run's stages (state.json's ``made_by``, `provenance.made_by`): one line per set-up,
    naming its stages where there were several (a run continued after an upgrade, or on another
    machine, or begun before set-ups were recorded: "not recorded")."""
    from rlhf_workflow.provenance import stages_by_setup

    stages_of = stages_by_setup(state)
    if not stages_of:
        return []
    if len(stages_of) == 1:
        return [f"every stage: {next(iter(stages_of))}"]
    return [f"{', '.join(stages)}: {setup}" for setup, stages in stages_of.items()]


CUT_SHARE = 0.5  # a policy's answers cut by max_new_tokens more often than this are said to be


def warnings(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """What a reader of the table must know: the gold column is empty and why, and the policies whose
    answers mostly ran out of tokens (their length, rewards and gold are those of cut answers)."""
    import yaml

    lines = []
    try:
        recipe = yaml.safe_load(RunLayout(run_dir).config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    evaluation = recipe.get("eval") if isinstance(recipe, dict) else None
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    sampling = evaluation.get("sampling") if isinstance(evaluation.get("sampling"), dict) else {}
    gold = evaluation.get("gold_function")
    if rows and all(row.get("gold") is None for row in rows):
        lines.append("No gold function is set (eval.gold_function): the gold columns are empty. Give the task's "
                     "judge to see whether the proxy reward's gains hold." if not gold else
                     f"The gold function {gold} scored no answer (null for every one; see <policy>/eval/gold.jsonl): "
                     "is it the judge of these prompts?")
    limit = sampling.get("max_new_tokens", "its limit")
    for row in rows:
        stopped = row.get("stopped")
        if isinstance(stopped, (int, float)) and 1 - stopped > CUT_SHARE:
            lines.append(f"{row['id']}: {1 - stopped:.0%} of its answers hit eval.sampling.max_new_tokens ({limit}) "
                         "before ending their turn: its length, rewards and gold are those of cut answers; raise "
                         "eval.sampling.max_new_tokens to see whole ones.")
    return lines


def stage_times(run_dir: Path, seconds: dict[str, float]) -> list[tuple[str, float | None]]:
    """Every stage of the run in the order it runs (`stages.plan`) with its seconds (state.json),
    None for those still to do; without a recipe that loads, the stages state.json records."""
    from rlhf_workflow.eval.compare import recipe_of_run
    from rlhf_workflow.stages import plan

    try:
        names = [stage.name for stage in plan(recipe_of_run(run_dir), run_dir)]
    except (UserError, ValueError):
        names = []
    return [(name, seconds.get(name)) for name in names] + [(name, t) for name, t in seconds.items() if name not in names]


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report/{report.md, report.html, *.png}; returns the Markdown file."""
    from rlhf_workflow.data.io import atomic_write_text

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    layout = RunLayout(run_dir)
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot_curves(rows, out)
    for extra in (_plot_proxy_vs_gold(rows, out), _plot_pair_rewards(run_dir, out), _plot_ifeval_types(rows, out)):
        if extra:
            plots.append(extra)
    state_file = layout.state
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    seconds = state.get("seconds", {})
    times = stage_times(run_dir, seconds)
    todo = sum(t is None for _, t in times)
    made_lines = made_by_lines(state)
    title = f"rlhf-workflow report: {run_dir.name}"
    feedback_lines = [f"{row['id']}, length-controlled win rate vs π0: {row['lc_win_rate_vs_initial_note']}."
                      for row in rows if row.get("lc_win_rate_vs_initial_note")]
    for kind, what in (("rm", "Bradley–Terry reward model"), ("pm", "pairwise preference model")):
        path = layout.feedback.accuracy(kind)
        if path.exists():
            result = json.loads(path.read_text())
            feedback_lines.append(f"The {what} trained on simulated human feedback: held-out accuracy "
                                  f"{result['accuracy']:.3f} on {result['scored']} pairs.")
    feedback_lines += warnings(run_dir, rows)
    md = [f"# {title}", "", "Held-out evaluation of each policy (95 % bootstrap intervals over prompts in brackets):",
          "", table(rows), ""] + [line + "\n" for line in feedback_lines]
    extra_tables = ifeval_tables(rows)
    by_length = gold_by_length(run_dir)
    if by_length is not None:
        extra_tables.append(("Gold score by response length: mean (responses), length bins from the quintiles of "
                             "all responses", *gold_by_length_table(*by_length)))
        plots.append(_plot_gold_by_length(*by_length, out))
    try:
        comparisons = paired_comparisons(run_dir)
    except UserError as exc:  # e.g. a run written by an older version whose config no longer loads
        logger.warning("report of %s: no paired comparisons (%s)", run_dir, exc)
        comparisons = []
    image = "compare.png" if comparisons and compare_plot(comparisons, out / "compare.png") else None
    for heading, header, cells in extra_tables:
        md += [f"## {heading}", ""] + markdown_table(header, cells) + [""]
    if comparisons:
        md += compare_markdown(comparisons, image)
    for name, label in plots:
        md += [f"## {label}", "", f"![{label}]({name})", ""]
    if times:
        md += ["## Time per stage", "", "| stage | seconds |", "| --- | --- |"]
        md += [f"| {stage} | {'to do' if value is None else f'{value:.1f}'} |" for stage, value in times]
        md += ["", f"total: {sum(seconds.values()):.1f} s" + (f"; {todo} stages to do" if todo else ""), ""]
    if made_lines:
        md += ["## Made by", ""] + [f"- {line}" for line in made_lines] + [""]
    atomic_write_text(layout.report_markdown, "\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>", "<p>Held-out evaluation of each policy (95 % bootstrap intervals over "
            "prompts in brackets):</p>", "<table border='1' cellpadding='4' style='border-collapse:collapse'>",
            "<tr>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS) + "</tr>"]
    for row in rows:
        body.append("<tr>" + "".join(f"<td>{html.escape(_cell(row, k))}</td>" for k, _ in COLUMNS) + "</tr>")
    body.append("</table>")
    body += [f"<p>{html.escape(line)}</p>" for line in feedback_lines]
    for heading, header, cells in extra_tables:
        body += [f"<h2>{html.escape(heading)}</h2>", html_table(header, cells)]
    if comparisons:
        body += compare_html(comparisons, out / image if image else None)
    for name, label in plots:  # embedded: report.html is one file that shows its plots wherever it goes
        body += [f"<h2>{html.escape(label)}</h2>", html_image(out / name, label)]
    if times:
        body.append("<h2>Time per stage</h2><table border='1' cellpadding='4' style='border-collapse:collapse'>")
        body += [f"<tr><td>{html.escape(s)}</td><td>{'to do' if v is None else f'{v:.1f} s'}</td></tr>"
                 for s, v in times]
        body.append("</table>" + (f"<p>{todo} stages to do</p>" if todo else ""))
    if made_lines:
        body += ["<h2>Made by</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in made_lines] + ["</ul>"]
    atomic_write_text(layout.report_html, html_page(title, body))
    return layout.report_markdown
