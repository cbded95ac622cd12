"""LoRA adapters (peft): wrap a model with them, tell a wrapped model, and reach the model inside.

The one place that knows about peft's wrapper, so that loading, saving and the forward passes
never import each other to ask "is this a LoRA model?".
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_workflow.config import LoraConfig

log = logging.getLogger(__name__)


def apply_lora(model: Any, lora: "LoraConfig", *, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with trainable LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as exc:  # e.g. target modules that match no module of this model
        from rlhf_workflow.errors import UserError, config_key

        raise UserError(f"{config_key('model.lora')}: {str(exc).splitlines()[0][:300]} "
                        f"({config_key('model.lora.target_modules')}={lora.target_modules})") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: %d of %d parameters trainable (%.2f%%)", lora.r, trainable, total, 100 * trainable / total)
    return model


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def unwrap(model: Any) -> Any:
    """The plain transformers model inside a peft wrapper (the adapters stay injected in it)."""
    return model.get_base_model() if is_peft_model(model) else model
