"""The training commands' configs (sft, train-rm, train-pm, dpo) and the options each shares with a run
recipe's sections (`DataOptions`, `RewardModelOptions`, `PreferenceModelOptions`, `ReferenceOptions`,
`DPOOptions`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_workflow.config.base import ApplyChatTemplate, GroupByPrompt, OutputDir, SequenceLength, Strict
from rlhf_workflow.config.model import ModelConfig


class DataOptions(Strict):
    """How rows become token sequences: what a training command's `data` and a run's sections share."""

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


class TrainingCommandConfig(Strict):
    """What every training command has: an output directory, a model, data and the loop's settings."""

    data_kind: ClassVar[str] = "training rows"
    input_keys = ("data.train", "data.eval", "model.name_or_path", "model.tokenizer")
    output_keys = ("output_dir",)
    output_dir: OutputDir = "runs/train"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def missing(self) -> list[tuple[str, str]]:
        return super().missing() + ([] if self.data.train else [("data.train", f"data.train is required: the file of {self.data_kind}")])


class SFTConfig(TrainingCommandConfig):
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


class RewardModelConfig(RewardModelOptions, TrainingCommandConfig):
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


class PreferenceModelConfig(PreferenceModelOptions, TrainingCommandConfig):
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
    """How DPO's reference pass runs: what the `dpo` command's reference and a run's dpo.reference share."""

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
    """The DPO settings that the `dpo` command and every iteration of a run share."""

    loss: DPOLossConfig = DPOLossConfig()
    logprob_chunk: int = Field(
        1024, ge=0, description="response tokens per chunk of the vocabulary projection (0 = all at once)"
    )


class DPOConfig(DPOOptions, TrainingCommandConfig):
    """`rlhf-workflow dpo`: direct preference optimisation of a policy on preference pairs."""

    data_kind: ClassVar[str] = "preference pairs"
    input_keys = TrainingCommandConfig.input_keys + ("reference.name_or_path",)
    output_dir: OutputDir = "runs/dpo"
    reference: ReferenceConfig = ReferenceConfig()
