"""Evaluating a policy of the online loop on the held-out prompts.

The loop samples responses of π0 and of every π_t to the held-out prompts (`generate`) and scores
them with the proxy judge (`annotate`) into ``RUN/<policy>/eval/scored.jsonl``. From those files,
and the task's gold judge when it has one, this module computes

* proxy reward: the mean judge score (reward model or function judge; a preference model's
  within-prompt ranking scores say nothing across policies, so for it only the win rate is given);
* gold: the mean gold score, with a 95 % bootstrap interval over prompts (each response's score is
  kept in ``eval/gold.jsonl`` for `eval.compare`); and the gold gain over
  π0, the mean over prompts of (this policy's mean gold − π0's), with its own interval: the two
  policies answer the same prompts, so the paired difference is far less noisy than the two means;
* win rate vs π0: sample k of π_t against sample k of π0 for the same prompt, judged by the proxy
  (a reward model or function compares scores, ties count ½; a preference model compares the two
  texts in both orders, `PreferenceJudge.compare_many`); and the length-controlled win rate, the
  win rate a logistic model of those outcomes on the length difference predicts at equal length
  (`eval.stats.length_controlled_win_rate`), which says how much of the win is only length;
* IFEval's numbers, when the eval prompts are IFEval-format rows (``instruction_id_list``): prompt-
  and instruction-level accuracy, strict and loose, by IFEval's own checkers (`tasks.ifeval`), each
  sampled response counted as one answer, with intervals over prompts; and the rate per instruction type;
* length: mean response tokens;
* KL(π_t ‖ π0) ≈ mean over sampled responses y of log π_t(y|x) − log π0(y|x): an unbiased
  estimate when the responses are sampled from π_t itself (temperature 1, no top-p / top-k).
  log π_t(y|x) is the sampling pass's own (``response_logps`` of the generations, summed over the
  sampled tokens); log π0(y|x), and log π_t where the backend gave none, is a forward pass over
  the sampled token ids (``response_token_ids``, which the run's evaluation asks the generator
  for). Without them, the responses are scored as the chat template tokenizes their text (the
  end-of-turn token only where the model produced it): about 1 SmolLM2 sample in 20 then scores
  other tokens than those sampled, off by up to 18 nats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rlhf_workflow.config import ModelConfig, RunConfig
from rlhf_workflow.data.schemas import prompt_messages
from rlhf_workflow.data.io import write_jsonl
from rlhf_workflow.data.run_layout import RunLayout
from rlhf_workflow.eval.stats import bootstrap_interval, length_controlled_win_rate, mean, pair_outcome
from rlhf_workflow.tasks.ifeval import follows, is_ifeval_row, summary



def win_rates(ours: dict[tuple[str, int], float | None],
              theirs: dict[tuple[str, int], float | None]) -> list[tuple[tuple[str, int], float]]:
    """((prompt id, sample k), 1 / ½ / 0) for every sample both sides scored: ours better / tied / worse."""
    out = []
    for key, value in ours.items():
        other = theirs.get(key)
        if value is None or other is None:
            continue
        out.append((key, pair_outcome(value, other)))
    return out


def _with_length_differences(outcomes: list[tuple[tuple[str, int], float]], rows: list[dict[str, Any]],
                             base_rows: dict[str, dict[str, Any]]) -> list[list[tuple[float, float]]]:
    """The outcomes grouped by prompt, each with its length difference in tokens (this policy's
    sample k minus π0's sample k); outcomes of samples without token counts are left out."""
    tokens = {row["id"]: row.get("response_tokens") or [] for row in rows}
    base_tokens = {i: row.get("response_tokens") or [] for i, row in base_rows.items()}
    groups: dict[str, list[tuple[float, float]]] = {}
    for (prompt_id, k), outcome in outcomes:
        mine, theirs = tokens.get(prompt_id, []), base_tokens.get(prompt_id, [])
        if k < len(mine) and k < len(theirs) and isinstance(mine[k], int) and isinstance(theirs[k], int):
            groups.setdefault(prompt_id, []).append((outcome, float(mine[k] - theirs[k])))
    return list(groups.values())


IFEVAL_KEYS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def ifeval_metrics(rows: list[dict[str, Any]], resamples: int) -> dict[str, Any]:
    """``ifeval_<prompt|instruction>_<strict|loose>`` (with ``_ci95``, resampling prompts),
    ``ifeval_types`` (rate per instruction type) and ``ifeval_unscored`` (responses of rows whose
    instructions IFEval cannot check, e.g. an unknown id) for the sampled responses of ``rows``."""
    results, groups, unscored = [], {key: [] for key in IFEVAL_KEYS}, 0
    for row in rows:
        per_prompt = {key: [] for key in IFEVAL_KEYS}
        for text in row["responses"]:
            try:
                followed = follows(row, text)
            except ValueError:
                unscored += 1
                continue
            results.append(followed)
            per_prompt["prompt_strict"].append(float(all(f.strict for f in followed)))
            per_prompt["prompt_loose"].append(float(all(f.loose for f in followed)))
            per_prompt["instruction_strict"] += [float(f.strict) for f in followed]
            per_prompt["instruction_loose"] += [float(f.loose) for f in followed]
        for key in IFEVAL_KEYS:
            groups[key].append(per_prompt[key])
    if not results:
        return {"ifeval_unscored": unscored}
    totals = summary(results)
    out: dict[str, Any] = {}
    for key in IFEVAL_KEYS:
        out[f"ifeval_{key}"] = totals[key]
        interval = bootstrap_interval(groups[key], resamples)
        if interval is not None:
            out[f"ifeval_{key}_ci95"] = list(interval)
    out["ifeval_types"] = totals["types"]
    out["ifeval_unscored"] = unscored
    return out


def response_logps(model_config: ModelConfig, tokenizer: Any, rows: list[dict], *, chat_template: bool, device: Any,
                   chunk: int = 1024, batch_prompts: int = 8, keep_prompt_states: bool = False) -> dict[tuple[str, int], float]:
    """log π(response | prompt) under the model of ``model_config`` for every response of ``rows``
    (each prompt computed once for its responses: the shared-prefix layout). A row's sampled token
    ids (``response_token_ids``) are scored as they are; otherwise a response is its text as the
    chat template tokenizes it. ``keep_prompt_states``: keep each prompt's keys and values in the
    process (`models.prompt_states`), so that a later call on the same prompts (π0 reading the next
    policy's answers) computes only the responses."""
    import torch

    from rlhf_workflow.data.templating import encode_prompt, encode_prompt_response, end_of_turn_ids
    from rlhf_workflow.models.layout import LayoutOptions, layout
    from rlhf_workflow.models.loading import load_model, local_directory
    from rlhf_workflow.models.logprobs import SequenceLogprobs, token_logprobs
    from rlhf_workflow.models.prompt_states import model_identity, response_hidden_states, shared, supports

    loaded = load_model(model_config.model_copy(update={"lora": model_config.lora.model_copy(update={"r": 0})}))
    model = SequenceLogprobs(loaded.to(device).eval(), chunk)
    states = None
    if keep_prompt_states and supports(loaded):
        states = shared(model_identity(local_directory(model_config.name_or_path),
                                       [model_config.model_dump(mode="json"), str(device)]))
    options = LayoutOptions(share_prefix=True)
    end_of_turn = end_of_turn_ids(tokenizer, loaded, chat_template=chat_template)
    groups, keys = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"], chat_template=chat_template)
        reasons = row.get("finish_reasons") or []
        sampled = row.get("response_token_ids")
        responses = []
        for k, text in enumerate(row["responses"]):
            if isinstance(sampled, list) and len(sampled) == len(row["responses"]):
                ids = list(sampled[k])
            else:
                ids, _ = encode_prompt_response(tokenizer, row["prompt"], text, chat_template=chat_template)
                ids = ids[len(prompt):]
                if k < len(reasons) and reasons[k] == "length":  # cut off: the end-of-turn token was never sampled
                    while ids and ids[-1] in end_of_turn:
                        ids = ids[:-1]
            if ids:
                responses.append(ids)
                keys.append((row["id"], k))
        if responses:
            groups.append((prompt, responses))
    values: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(groups), batch_prompts):
            if states is None:
                batch = layout(groups[start : start + batch_prompts], tokenizer.pad_token_id, options)
                values.extend(model({k: v.to(device) for k, v in batch.items()})[0].double().tolist())
                continue
            sequences = [(prompt, response) for prompt, responses in groups[start : start + batch_prompts]
                         for response in responses]
            hidden, prompt_last, lengths = response_hidden_states(
                loaded, [p for p, _ in sequences], [r for _, r in sequences], states, tokenizer.pad_token_id)
            # the state before each response token predicts it: the prompt's last, then the response's own
            before = torch.cat([torch.cat([prompt_last[s, None], hidden[s, : lengths[s] - 1]]) for s in range(len(sequences))])
            targets = torch.tensor([t for _, r in sequences for t in r], device=hidden.device)
            logp = token_logprobs(before, loaded.get_output_embeddings(), targets, chunk)
            values.extend(torch.stack([part.sum() for part in logp.split(lengths.tolist())]).double().tolist())
    return dict(zip(keys, values))


def evaluate_policy(config: RunConfig, run_dir: Path, name: str, policy: ModelConfig, *, baseline: str | None,
                    gold: Any | None, compare: Callable[[list[tuple]], list[float]] | None, device: Any) -> dict[str, Any]:
    """The metrics of one policy (see the module docstring) from its scored eval samples.

    ``baseline`` names the directory (under ``run_dir``) of π0's evaluation; ``gold`` is the task's
    judge (anything with ``score(rows) -> Scores``) or None; ``compare`` gives P(a ≻ b) for
    (conversation, a, b) items, both orders averaged, when the proxy is a preference model."""
    from rlhf_workflow.data.io import read_rows, row_to_dict
    from rlhf_workflow.data.schemas import GenerationRow
    from rlhf_workflow.models.loading import load_tokenizer

    files = RunLayout(run_dir).policy_dir(name).eval
    rows = [row_to_dict(r) for r in read_rows(files.scored, GenerationRow)]
    metrics: dict[str, Any] = {"id": name, "policy": policy.name_or_path, "prompts": len(rows),
                               "responses": sum(len(r["responses"]) for r in rows)}
    resamples = config.eval.bootstrap

    def summarise(key: str, groups: list[list[float]]) -> None:
        flat = [v for group in groups for v in group]
        metrics[key] = mean(flat)
        interval = bootstrap_interval(groups, resamples)
        if interval is not None:
            metrics[f"{key}_ci95"] = list(interval)

    if compare is None:
        summarise("proxy_reward", [[r for r in row["rewards"] if r is not None] for row in rows])
    if gold is not None:
        gold_scores = gold.score(rows)
        summarise("gold", [[r for r in rewards if r is not None] for rewards in gold_scores.rewards])
        metrics["gold_unscored"] = sum(r is None for rewards in gold_scores.rewards for r in rewards)
        # {"id", "gold": [one score per response, null where the judge could not score it]}
        write_jsonl(files.gold, [{"id": row["id"], "gold": rewards} for row, rewards in zip(rows, gold_scores.rewards)])
    if rows and all(is_ifeval_row(row) for row in rows):
        metrics.update(ifeval_metrics(rows, resamples))
    tokens = [t for row in rows for t in (row.get("response_tokens") or []) if isinstance(t, int)]
    metrics["length_tokens"] = mean(tokens)
    metrics["length_chars"] = mean([len(text) for row in rows for text in row["responses"]])
    metrics["stopped"] = mean([1.0 if f == "stop" else 0.0 for row in rows for f in (row.get("finish_reasons") or [])])

    if baseline is None or baseline == name:
        return metrics
    base_rows = {r["id"]: r for r in (row_to_dict(x) for x in read_rows(RunLayout(run_dir).policy_dir(baseline).eval.scored,
                                                                         GenerationRow))}
    if compare is None:
        ours = {(row["id"], k): r for row in rows for k, r in enumerate(row["rewards"])}
        theirs = {(i, k): r for i, row in base_rows.items() for k, r in enumerate(row["rewards"])}
        outcomes = win_rates(ours, theirs)
    else:
        items, keys = [], []
        for row in rows:
            other = base_rows.get(row["id"])
            for k, text in enumerate(row["responses"]):
                if other is not None and k < len(other["responses"]):
                    items.append((prompt_messages(row["prompt"]), text, other["responses"][k]))
                    keys.append((row["id"], k))
        outcomes = [(key, pair_outcome(p, 0.5)) for key, p in zip(keys, compare(items))]
    by_prompt: dict[str, list[float]] = {}
    for (prompt_id, _), outcome in outcomes:
        by_prompt.setdefault(prompt_id, []).append(outcome)
    summarise("win_rate_vs_initial", list(by_prompt.values()))
    length_controlled = length_controlled_win_rate(
        _with_length_differences(outcomes, rows, base_rows), resamples)
    if length_controlled is not None:
        lc, interval, _, why_not = length_controlled
        if lc is not None:
            metrics["lc_win_rate_vs_initial"] = lc
        if why_not:  # no value, or no interval, and why
            metrics["lc_win_rate_vs_initial_note"] = why_not
        if interval is not None:
            metrics["lc_win_rate_vs_initial_ci95"] = list(interval)
    if gold is not None:
        base_list = list(base_rows.values())
        base_gold = dict(zip((r["id"] for r in base_list), gold.score(base_list).rewards))
        gains = []
        for row, rewards in zip(rows, gold_scores.rewards):
            mine, theirs_mean = mean([r for r in rewards if r is not None]), \
                mean([r for r in base_gold.get(row["id"], []) if r is not None])
            if mine is not None and theirs_mean is not None:
                gains.append([mine - theirs_mean])
        summarise("gold_gain_vs_initial", gains)
    if config.eval.kl:
        initial, policy = config.sampling_model(config.policy), config.sampling_model(policy)  # as they sampled
        tokenizer = load_tokenizer(initial.tokenizer or initial.name_or_path, trust_remote_code=initial.trust_remote_code)
        kwargs = dict(chat_template=config.apply_chat_template, device=device, chunk=config.dpo.logprob_chunk)
        sampled = [row.get("response_logps") for row in rows]
        if all(isinstance(values, list) and len(values) == len(row["responses"]) for values, row in zip(sampled, rows)):
            # the sampling pass's own log-probabilities: no second forward pass of the policy
            mine_logp = {(row["id"], k): value for row, values in zip(rows, sampled) for k, value in enumerate(values)}
        else:
            mine_logp = response_logps(policy, tokenizer, rows, **kwargs)
        initial_logp = response_logps(initial, tokenizer, rows, keep_prompt_states=True, **kwargs)
        groups: dict[str, list[float]] = {}
        for key, value in mine_logp.items():
            if key in initial_logp:
                groups.setdefault(key[0], []).append(value - initial_logp[key])
        summarise("kl_vs_initial", list(groups.values()))
    return metrics
