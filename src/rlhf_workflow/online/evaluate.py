"""Evaluating a policy of the online loop on the held-out prompts.

For π0 and for every π_t: sample responses to the held-out prompts (`generate`), score them with
the proxy judge (`annotate`) and, when the task has one, with its gold judge; then

* proxy reward: the mean judge score (reward model or function judge; a preference model's
  within-prompt ranking scores say nothing across policies, so for it only the win rate is given);
* gold: the mean gold score, with a 95 % bootstrap interval over prompts; and the gold gain over
  π0, the mean over prompts of (this policy's mean gold − π0's), with its own interval: the two
  policies answer the same prompts, so the paired difference is far less noisy than the two means;
* win rate vs π0: sample k of π_t against sample k of π0 for the same prompt, judged by the proxy
  (a reward model or function compares scores, ties count ½; a preference model compares the two
  texts in both orders, `PreferenceJudge.compare_many`);
* length: mean response tokens;
* KL(π_t ‖ π0) ≈ mean over sampled responses y of log π_t(y|x) − log π0(y|x): an unbiased
  estimate when the responses are sampled from π_t itself (temperature 1, no top-p / top-k). The
  responses are scored as the chat template tokenizes their text (the end-of-turn token only
  where the model produced it), which for ordinary text is the sampled token sequence.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

EVAL_DIR = "eval"


def bootstrap_interval(groups: Sequence[Sequence[float]], resamples: int, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile interval of the mean, resampling whole groups (the samples of one prompt
    together, as they are not independent). None with fewer than two groups or no resamples."""
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


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def win_rates(ours: dict[tuple[str, int], float | None], theirs: dict[tuple[str, int], float | None]) -> list[tuple[str, float]]:
    """(prompt id, 1 / ½ / 0) for every sample both sides scored: ours better / tied / worse."""
    out = []
    for key, value in ours.items():
        other = theirs.get(key)
        if value is None or other is None:
            continue
        out.append((key[0], 1.0 if value > other else 0.5 if value == other else 0.0))
    return out


def response_logps(model_config: Any, tokenizer: Any, rows: list[dict], *, chat_template: bool, device: Any,
                   chunk: int = 1024, batch_prompts: int = 8) -> dict[tuple[str, int], float]:
    """log π(response | prompt) under the model of ``model_config`` for every response of ``rows``
    (each prompt computed once for its responses: the shared-prefix layout)."""
    import torch

    from rlhf_workflow.data.templating import encode_prompt, encode_prompt_response
    from rlhf_workflow.models.loading import load_model
    from rlhf_workflow.train.batching import LayoutOptions, layout
    from rlhf_workflow.train.dpo import SequenceLogprobs

    model = SequenceLogprobs(load_model(model_config.model_copy(update={"lora": model_config.lora.model_copy(
        update={"r": 0})})).to(device).eval(), chunk)
    options = LayoutOptions(share_prefix=True)
    special = set(tokenizer.all_special_ids)
    groups, keys = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"], chat_template=chat_template)
        reasons = row.get("finish_reasons") or []
        responses = []
        for k, text in enumerate(row["responses"]):
            ids, _ = encode_prompt_response(tokenizer, row["prompt"], text, chat_template=chat_template)
            ids = ids[len(prompt):]
            if k < len(reasons) and reasons[k] == "length":  # cut off: the end-of-turn token was never sampled
                while ids and ids[-1] in special:
                    ids = ids[:-1]
            if ids:
                responses.append(ids)
                keys.append((row["id"], k))
        if responses:
            groups.append((prompt, responses))
    values: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(groups), batch_prompts):
            batch = layout(groups[start : start + batch_prompts], tokenizer.pad_token_id, options)
            values.extend(model({k: v.to(device) for k, v in batch.items()})[0].double().tolist())
    return dict(zip(keys, values))


def evaluate_policy(config: Any, run_dir: Path, name: str, policy: Any, *, eval_prompts: Path,
                    baseline: str | None, initial_policy: Any, state: Any) -> dict[str, Any] | None:
    """Sample, score and compare one policy (see the module docstring); the metrics row on the main
    process, None on the others. ``baseline`` names the directory (under run_dir) of π0's evaluation."""
    from rlhf_workflow.config import AnnotateConfig, GenerateConfig
    from rlhf_workflow.data.io import read_rows, row_to_dict
    from rlhf_workflow.data.schemas import GenerationRow
    from rlhf_workflow.generate.stage import run_generate
    from rlhf_workflow.models.loading import load_tokenizer
    from rlhf_workflow.online.annotate import run_annotate
    from rlhf_workflow.online.judges import FunctionJudge, load_function, make_judge

    out = run_dir / name / EVAL_DIR
    generations, scored = out / "generations.jsonl", out / "scored.jsonl"
    g = config.generation
    # as many rows per batch as in training generation, whatever the number of samples per prompt
    rows_per_batch = g.hf.batch_size * g.sampling.n
    hf = g.hf.model_copy(update={"batch_size": max(1, rows_per_batch // config.eval.sampling.n)})
    run_generate(GenerateConfig(prompts=str(eval_prompts), output=str(generations), backend=g.backend, model=policy,
                                sampling=config.eval.sampling, apply_chat_template=config.apply_chat_template,
                                hf=hf, vllm=g.vllm, openai=g.openai))
    run_annotate(AnnotateConfig(input=str(generations), output=str(scored), judge=config.judge,
                                apply_chat_template=config.apply_chat_template))
    if not state.is_main_process:
        return None
    rows = [row_to_dict(r) for r in read_rows(scored, GenerationRow)]
    metrics: dict[str, Any] = {"id": name, "policy": policy.name_or_path, "prompts": len(rows),
                               "responses": sum(len(r["responses"]) for r in rows)}
    resamples = config.eval.bootstrap

    def summarise(key: str, groups: list[list[float]]) -> None:
        flat = [v for group in groups for v in group]
        metrics[key] = _mean(flat)
        interval = bootstrap_interval(groups, resamples)
        if interval is not None:
            metrics[f"{key}_ci95"] = list(interval)

    proxy_comparable = config.judge.type != "preference_model"
    if proxy_comparable:
        summarise("proxy_reward", [[r for r in row["rewards"] if r is not None] for row in rows])
    gold_judge = FunctionJudge(load_function(config.eval.gold_function), config.eval.gold_function) \
        if config.eval.gold_function else None
    if gold_judge is not None:
        gold = gold_judge.score(rows)
        summarise("gold", [[r for r in rewards if r is not None] for rewards in gold.rewards])
        metrics["gold_unscored"] = sum(r is None for rewards in gold.rewards for r in rewards)
    tokens = [t for row in rows for t in (row.get("response_tokens") or []) if isinstance(t, int)]
    metrics["length_tokens"] = _mean(tokens)
    metrics["length_chars"] = _mean([len(text) for row in rows for text in row["responses"]])
    metrics["stopped"] = _mean([1.0 if f == "stop" else 0.0 for row in rows for f in (row.get("finish_reasons") or [])])

    if baseline is not None and baseline != name:
        base_rows = {r["id"]: r for r in (row_to_dict(x) for x in read_rows(run_dir / baseline / EVAL_DIR / "scored.jsonl",
                                                                             GenerationRow))}
        if proxy_comparable:
            ours = {(row["id"], k): r for row in rows for k, r in enumerate(row["rewards"])}
            theirs = {(i, k): r for i, row in base_rows.items() for k, r in enumerate(row["rewards"])}
            outcomes = win_rates(ours, theirs)
        else:
            judge = make_judge(config.judge, device=state.device, chat_template=config.apply_chat_template)
            items, ids = [], []
            for row in rows:
                other = base_rows.get(row["id"])
                for k, text in enumerate(row["responses"]):
                    if other is not None and k < len(other["responses"]):
                        items.append((row["prompt"] if isinstance(row["prompt"], list) else
                                      [{"role": "user", "content": row["prompt"]}], text, other["responses"][k]))
                        ids.append(row["id"])
            probs = judge.judge.compare_many(items)  # type: ignore[attr-defined]
            outcomes = [(i, 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0) for i, p in zip(ids, probs)]
        by_prompt: dict[str, list[float]] = {}
        for prompt_id, outcome in outcomes:
            by_prompt.setdefault(prompt_id, []).append(outcome)
        summarise("win_rate_vs_initial", list(by_prompt.values()))
        if gold_judge is not None:
            base_list = list(base_rows.values())
            base_gold = dict(zip((r["id"] for r in base_list), gold_judge.score(base_list).rewards))
            gains = []
            for row, rewards in zip(rows, gold.rewards):
                mine, theirs = _mean([r for r in rewards if r is not None]), \
                    _mean([r for r in base_gold.get(row["id"], []) if r is not None])
                if mine is not None and theirs is not None:
                    gains.append([mine - theirs])
            summarise("gold_gain_vs_initial", gains)
        if config.eval.kl:
            tokenizer = load_tokenizer(initial_policy.tokenizer or initial_policy.name_or_path,
                                       trust_remote_code=initial_policy.trust_remote_code)
            kwargs = dict(chat_template=config.apply_chat_template, device=state.device, chunk=config.dpo.logprob_chunk)
            mine = response_logps(policy, tokenizer, rows, **kwargs)
            initial = response_logps(initial_policy, tokenizer, rows, **kwargs)
            groups: dict[str, list[float]] = {}
            for key, value in mine.items():
                groups.setdefault(key[0], []).append(value - initial[key])
            summarise("kl_vs_initial", list(groups.values()))
    return metrics
