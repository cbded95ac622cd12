"""Generation: n sampled responses per prompt from a policy.

* `base`   — the `Generator` protocol, requests/results, per-prompt seeds, stop strings
* `hf`     — transformers backend (default; CPU or GPU): length-sorted batches, the prompt computed
             once for its n samples, finished rows dropped from the batch
* `vllm`   — vLLM's offline engine (optional GPU extra)
* `openai` — any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp, TGI)
* `stage`  — the `generate` command: resumable, sharded over processes, failures listed
"""

from rlhf_workflow.generate.base import (
    GenerationRequest,
    GenerationResult,
    Generator,
    Sample,
    prompt_seed,
)

__all__ = ["GenerationRequest", "GenerationResult", "Generator", "Sample", "prompt_seed"]
