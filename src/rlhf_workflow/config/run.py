"""`rlhf-workflow run`'s recipe: the loop's own settings, and sections that are the commands' own settings
under the commands' own names (`dpo.train.lr` is the `dpo` command's `train.lr`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from rlhf_workflow.config.base import ApplyChatTemplate, Dtype, PairStrategy, Strict, TaskName
from rlhf_workflow.config.generation import GenerationOptions, SamplingConfig
from rlhf_workflow.config.judging import JudgeConfig, LengthPenaltyConfig, PairOptions
from rlhf_workflow.config.model import ModelConfig
from rlhf_workflow.config.training import (DataOptions, DPOOptions, PreferenceModelOptions, ReferenceOptions,
                                           RewardModelOptions, TrainConfig)


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
    """The DPO step of every iteration: the `dpo` command's settings (warm-started from the previous policy;
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
    """The reward model trained on the feedback: the `train-rm` command's settings."""

    model: ModelConfig | None = Field(None, description="its backbone; default: the policy's model")
    data: DataOptions = DataOptions(max_length=512)
    train: TrainConfig = TrainConfig(epochs=2, lr=1e-5, per_device_batch_size=8)


class FeedbackPreferenceModel(PreferenceModelOptions):
    """The preference model trained on the feedback (train_pm, or judge pm): the `train-pm` command's settings."""

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

    # a command's sections as a run recipe names them: a command's `model` is the run's `policy`, its
    # `train` the dpo step's (or a feedback model's) `dpo.train` (for did-you-mean hints)
    aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("policy",), "train": ("dpo.train",), "data": ("dpo.data",), "loss": ("dpo.loss",),
        "sampling": ("generation.sampling",), "hf": ("generation.hf",), "vllm": ("generation.vllm",),
        "openai": ("generation.openai",), "backend": ("generation.backend",), "strategy": ("pairs.strategy",),
        "min_margin": ("pairs.min_margin",), "logprob_chunk": ("dpo.logprob_chunk",),
    }
    # How the run names the keys of each stage it runs, for the messages from inside the stage
    # (`errors.keys_named`): {the command's key or section: the run's; "": the prefix of every other key}
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
