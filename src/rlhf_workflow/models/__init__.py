"""Everything that runs a model, for training, scoring and evaluation alike.

* `loading` / `saving` — built-in names, .gguf files, HF directories and ids; safetensors out
* `lora`               — peft adapters: apply, detect, unwrap
* `layout`             — batch layouts: padded rows, a prompt shared by its responses, packed rows
* `forward`            — forward passes that read a few positions; 4-D masks for the attention
* `logprobs`           — per-sequence response log-probs, the vocabulary projection in chunks
* `reward`, `preference`, `ranking` — the Bradley–Terry reward model, the pairwise preference
  model and ranking n responses with it
"""

from rlhf_workflow.models.loading import BUILTIN_MODELS, load_model, load_tokenizer, resolve_source
from rlhf_workflow.models.saving import save_model

__all__ = ["BUILTIN_MODELS", "load_model", "load_tokenizer", "resolve_source", "save_model"]
