"""Which model a command loads, and how: a command's `model`, a run's `policy`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf_workflow.config.base import Dtype, Strict


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
