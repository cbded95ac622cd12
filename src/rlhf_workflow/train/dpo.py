"""Direct preference optimisation: the `dpo` objective, the reference pass, and the `dpo` command.

Training holds one model, the policy. The reference log-probs log π_ref(y|x) of every pair are
computed before training in one inference pass (`precompute_reference`) and stored with the pairs
(``ref_chosen_logp``, ``ref_rejected_logp``); pairs that already carry them skip it. The
reference is the policy's starting model π0 (then the pass runs on the policy itself before its
first step, so no second copy is ever loaded), another model (``reference.name_or_path``), or,
with LoRA, the policy with its adapters disabled. ``reference.precompute=false`` runs a frozen
reference at every step instead, for comparison.

A batch of B pairs is one forward pass, laid out by `models.layout` (by default one row
``[prompt | chosen | rejected]`` per pair); log-probs are read only at response tokens, through
the vocabulary projection in chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rlhf_workflow.config import DPOConfig, DPOLossConfig, ModelConfig
from rlhf_workflow.data.schemas import PairRow
from rlhf_workflow.errors import UserError, model_source
from rlhf_workflow.models.layout import LayoutOptions, layout
from rlhf_workflow.models.logprobs import SequenceLogprobs
from rlhf_workflow.train.losses import dpo_loss, pair_accuracy
from rlhf_workflow.train.pairs import pair_row_length, tokenize_pairs

log = logging.getLogger(__name__)

REF_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")


def frozen_reference(policy: SequenceLogprobs, reference_model: Any | None) -> Callable[[dict], torch.Tensor]:
    """log π_ref for a batch: a separate frozen model, or (None) the LoRA policy with adapters disabled."""
    if reference_model is None:
        peft_model = policy.model

        @torch.no_grad()
        def with_adapters_off(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with peft_model.disable_adapter():
                return policy(batch)[0]

        return with_adapters_off
    reference = SequenceLogprobs(reference_model, policy.chunk).eval().requires_grad_(False)

    @torch.no_grad()
    def separate(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return reference(batch)[0]

    return separate


class DPOObjective:
    """Collate: pairs laid out by `models.layout.layout` (+ their reference log-probs). Loss: `dpo_loss`."""

    name = "dpo"

    def __init__(self, pad_token_id: int, loss: DPOLossConfig, options: LayoutOptions = LayoutOptions(),
                 reference: Callable[[dict], torch.Tensor] | None = None):
        self.pad_token_id = pad_token_id
        self.config = loss
        self.options = options
        self.reference = reference  # used for batches whose pairs carry no precomputed log-probs
        self.rows_per_example = 1 if options.share_prefix else 2

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups = [(e["prompt_ids"], (e["chosen_ids"], e["rejected_ids"])) for e in examples]
        batch = layout(groups, self.pad_token_id, self.options)
        if all(e.get(REF_FIELDS[0]) is not None for e in examples):
            # sequence order is pair-major: chosen, rejected, chosen, rejected, …
            batch["ref_logp"] = torch.tensor([e[f] for e in examples for f in REF_FIELDS], dtype=torch.float32)
        return batch

    def example_length(self, example: dict[str, Any]) -> int:
        return pair_row_length(example, self.options)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["last_row"].numel() // 2

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, tokens = model(batch)
        if "ref_logp" in batch:
            ref = batch["ref_logp"]
        elif self.reference is not None:
            ref = self.reference(batch)
        else:
            raise RuntimeError("a batch without reference log-probs and no reference model to compute them")
        scale = tokens.float() if self.config.length_normalize else torch.ones_like(logp)
        policy, ref = logp / scale, ref / scale
        c = self.config
        loss = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], loss_type=c.type, beta=c.beta,
                        label_smoothing=c.label_smoothing, nll=-logp[0::2] / tokens[0::2], rpo_alpha=c.rpo_alpha)
        with torch.no_grad():
            chosen = c.beta * (policy[0::2] - ref[0::2])  # the implicit rewards β log π/π_ref
            rejected = c.beta * (policy[1::2] - ref[1::2])
            metrics = {
                "rewards/chosen": chosen.sum(),
                "rewards/rejected": rejected.sum(),
                "rewards/margin": (chosen - rejected).sum(),
                "accuracy": pair_accuracy(chosen, rejected),
                "logps/chosen": logp[0::2].sum(),
                "logps/rejected": logp[1::2].sum(),
            }
        return loss, metrics


# --------------------------------------------------------------------------- the reference pass


@torch.inference_mode()
def reference_logps(reference: SequenceLogprobs, examples: list[dict], pad_token_id: int, options: LayoutOptions,
                    batch_size: int) -> list[tuple[float, float]]:
    """Summed log π_ref of (chosen, rejected) for each example, in order (batches sorted by length)."""
    was_training = reference.training
    reference.eval()
    out: list[tuple[float, float]] = [(math.nan, math.nan)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -sum(len(examples[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    device = next(reference.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = layout([(examples[i]["prompt_ids"], (examples[i]["chosen_ids"], examples[i]["rejected_ids"])) for i in chunk],
                       pad_token_id, options)
        logp = reference({k: v.to(device) for k, v in batch.items()})[0].double().view(-1, 2).tolist()
        for i, (chosen, rejected) in zip(chunk, logp):
            out[i] = (chosen, rejected)
    reference.train(was_training)
    return out


def precompute_reference(reference: SequenceLogprobs, examples: list[dict], rows: list[PairRow], path: Path,
                         accelerator: Any, *, pad_token_id: int, options: LayoutOptions, batch_size: int) -> None:
    """Fill ``ref_chosen_logp`` / ``ref_rejected_logp`` of every example that lacks them, and write
    the pairs with them to ``path`` (JSON Lines) as batches finish.

    Resumable: pairs already in ``path`` are read back, not recomputed. Processes split each round
    of batches and gather the results, so every process ends with every value.
    """
    from accelerate.utils import gather_object

    from rlhf_workflow.data.io import JsonlAppender, iter_jsonl

    by_id = {row.id: row for row in rows}
    # the main process opens the file first: that repairs a last line torn by a crash
    sink = JsonlAppender(path) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    try:
        if path.exists():
            for _, data in iter_jsonl(path, allow_empty=True):
                if data.get("id") in by_id and all(isinstance(data.get(f), (int, float)) for f in REF_FIELDS):
                    by_id[data["id"]] = by_id[data["id"]].model_copy(update={f: float(data[f]) for f in REF_FIELDS})
        for example in examples:
            row = by_id[example["id"]]
            if row.ref_chosen_logp is not None and row.ref_rejected_logp is not None:
                example.update({f: getattr(row, f) for f in REF_FIELDS})
        todo = [e for e in examples if e.get(REF_FIELDS[0]) is None]
        accelerator.wait_for_everyone()  # every process has read the file before the main one appends to it
        if sink is not None:  # the pairs that came with their log-probs (or from an earlier run) go first
            sink.append([by_id[e["id"]] for e in examples if e.get(REF_FIELDS[0]) is not None])
        if not todo:
            return
        accelerator.print(f"reference pass: log-probs of {len(todo)} pairs under the reference model -> {path}")
        step = batch_size * accelerator.num_processes
        for start in tqdm(range(0, len(todo), step), desc="reference", disable=not accelerator.is_main_process):
            round_ = todo[start : start + step]
            mine = round_[accelerator.process_index :: accelerator.num_processes]
            values = reference_logps(reference, mine, pad_token_id, options, batch_size) if mine else []
            results = gather_object([(e["id"], v) for e, v in zip(mine, values)]) if accelerator.num_processes > 1 \
                else [(e["id"], v) for e, v in zip(mine, values)]
            found = dict(results)
            bad = [i for i, (c, r) in found.items() if not (math.isfinite(c) and math.isfinite(r))]
            if bad:
                raise UserError(f"the reference model gave non-finite log-probs for pairs {bad[:5]}: check the model "
                                "(weights, dtype) before training against it")
            for example in round_:
                example[REF_FIELDS[0]], example[REF_FIELDS[1]] = found[example["id"]]
            if sink is not None:
                sink.append([by_id[e["id"]].model_copy(update={f: e[f] for f in REF_FIELDS}) for e in round_])
    finally:
        if sink is not None:
            sink.close()
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the command


def reference_model_config(config: DPOConfig) -> ModelConfig:
    """How to load a separate reference model: the policy's `ModelConfig` (dtype, device, attention,
    trust_remote_code, allow_pickle_weights, ...) with the reference's source, and nothing that only
    training needs (LoRA, train_layers, gradient checkpointing): the reference never trains.

    Its vocabulary is checked against the tokenizer the command tokenized the pairs with (the
    policy's), since those are the ids the reference reads."""
    model = config.model
    return model.model_copy(update={
        "name_or_path": config.reference.name_or_path or model.name_or_path,
        "tokenizer": model.tokenizer or model.name_or_path,
        "lora": model.lora.model_copy(update={"r": 0}),
        "train_layers": 0,
        "gradient_checkpointing": False,
    })


def run_dpo(config: DPOConfig, *, resume: bool = False, force: bool = False) -> Path:
    """The `dpo` command: preference pairs in, a policy out (HF causal LM, safetensors)."""
    from rlhf_workflow.models.loading import load_model
    from rlhf_workflow.models.lora import is_peft_model
    from rlhf_workflow.models.saving import save_model
    from rlhf_workflow.train.loop import train
    from rlhf_workflow.train.job import finish_job, preference_training_model, read_splits, start_job

    job = start_job(config, resume=resume, force=force)
    accelerator, output_dir, tokenizer = job.accelerator, job.output_dir, job.tokenizer
    options = LayoutOptions.from_config(config.train)

    def tokenize(rows: list[PairRow], source: str, dropped: list) -> list[dict]:
        return tokenize_pairs(rows, tokenizer, max_length=job.max_length, chat_template=config.data.apply_chat_template,
                              source=source, extra=lambda row: {f: getattr(row, f) for f in REF_FIELDS}, dropped=dropped,
                              limit=job.limit)

    train_split, eval_split = read_splits(config, PairRow, tokenize, "pair")

    with model_source("model.name_or_path"):
        policy_model = preference_training_model(load_model(config.model), config)
        policy = SequenceLogprobs(policy_model, config.logprob_chunk)
    lora = is_peft_model(policy.model)
    separate_reference = config.reference.name_or_path is not None or (not lora and not config.reference.precompute)
    reference_model = None
    if separate_reference:
        with model_source("reference.name_or_path" if config.reference.name_or_path else "model.name_or_path"):
            reference_model = load_model(reference_model_config(config)).to(accelerator.device)

    reference = None
    if config.reference.precompute:
        # π_ref = π0 is the policy before its first step: run the pass on it (adapters off with LoRA)
        if reference_model is not None:
            source = SequenceLogprobs(reference_model, config.logprob_chunk)
        else:
            source = policy
        source.to(accelerator.device)
        context = policy.model.disable_adapter() if lora and reference_model is None else contextlib.nullcontext()
        # in the precision the policy trains in (bf16 autocast with train.precision=bfloat16): at the first
        # step the policy then reads the same log-probs as its reference (loss log 2), and a bf16 pass
        # costs a third of an fp32 one on a CPU with fast bf16
        with context, accelerator.autocast():
            for name, split in (("train", train_split), ("eval", eval_split)):
                if split is not None:
                    precompute_reference(source, split.examples, split.rows, output_dir / f"{name}_pairs.ref.jsonl",
                                         accelerator, pad_token_id=tokenizer.pad_token_id, options=options,
                                         batch_size=config.reference.batch_size)
        del source
        reference_model = None  # training holds only the policy
    else:
        reference = frozen_reference(policy, reference_model)

    objective = DPOObjective(tokenizer.pad_token_id, config.loss, options, reference)
    trained = train(objective, policy, train_split.examples, config.train, output_dir, accelerator,
                    eval_examples=eval_split.examples if eval_split else None, resume=resume,
                    run_config=config.model_dump(mode="json"))
    return finish_job(job, lambda target, files: save_model(trained.model, tokenizer, target, extra_files=files), "policy", config,
                        (train_split, eval_split))

