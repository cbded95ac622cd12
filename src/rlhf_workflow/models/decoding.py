"""Token-by-token decoding on a CPU: a KV cache that grows in place, and attention for one new token.

What a decode step of a small model spends besides its matmuls, with transformers' defaults (from
a profile of SmolLM2-135M sampling 64 rows at a time on 2 cores, bf16):

* about 20 % in attention: `scaled_dot_product_attention` picks the CPU flash kernel, built for
  long queries, for a query of one token, and first copies the keys and values of each KV head to
  every query head that shares it (SmolLM2: 3 KV heads for 9 query heads);
* about 13 % in `DynamicCache`: every step concatenates the new token to the whole cache (a copy
  of all keys and values of every layer), and every finished row dropped copies it again.

`GrowingCache` keeps each layer's keys and values in buffers with room for ``reserve`` more tokens
and writes a new token in place; `decode_attention` computes a one-token query against the cache
as two batched matmuls over the KV heads, each query head reading its group's keys where they lie:
scores q·kᵀ in the model's dtype, softmax in fp32 (as transformers' eager attention does), then
the weighted sum of the values. Prompts (more than one query token) go to sdpa unchanged.

`decode_step` applies both to a model for the duration of a call, and only where they are known
to compute the same attention: a CPU, a model that runs sdpa, no training.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

ATTENTION = "rlhf_workflow_decode"  # the name decode_attention is registered under


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers with room to grow.

    The first update (the prompt) allocates ``length + reserve`` positions; each later token is
    copied into its slot; a full buffer doubles. ``keys`` / ``values`` are always the filled part.
    """

    def __init__(self, reserve: int = 64):
        super().__init__()
        self.reserve = max(1, reserve)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0

    def _views(self) -> None:
        assert self._keys is not None and self._values is not None
        self.keys = self._keys[..., : self._length, :]
        self.values = self._values[..., : self._length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        end = self._length + new
        if self._keys is None or end > self._keys.shape[-2]:
            capacity = end + self.reserve if self._keys is None else max(end, 2 * self._keys.shape[-2])
            keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if self._length:
                keys[..., : self._length, :] = self.keys
                values[..., : self._length, :] = self.values
            self._keys, self._values = keys, values
        first = self._length == 0
        self._keys[..., self._length : end, :] = key_states
        self._values[..., self._length : end, :] = value_states
        self._length = end
        self._views()
        if first:  # the prompt's attention reads the states it was given, as with DynamicLayer
            return key_states, value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def reset(self) -> None:
        self._keys = self._values = None
        self._length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if tokens_to_remove and self._keys is not None:
            self._length = max(0, self._length + tokens_to_remove)
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._keys is not None:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)  # type: ignore[union-attr]
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._keys is not None and self._values is not None:
            # copy the filled positions only: the room left after them holds nothing yet
            keys = self._keys.new_empty((len(indices), *self._keys.shape[1:]))
            values = self._values.new_empty((len(indices), *self._values.shape[1:]))
            keys[..., : self._length, :] = self._keys[indices, ..., : self._length, :]
            values[..., : self._length, :] = self._values[indices, ..., : self._length, :]
            self._keys, self._values = keys, values
            self._views()


class GrowingCache(DynamicCache):
    """A `DynamicCache` made of `GrowingLayer` s, one per decoder layer as the model first writes it."""

    def __init__(self, reserve: int):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(GrowingLayer, reserve=reserve))  # type: ignore[arg-type]


def decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """softmax(q kᵀ · scaling + mask) v for a query of one token, grouped by KV head.

    query ``[B, H, 1, D]``, key / value ``[B, Hkv, L, D]`` with H = g · Hkv; the g query heads of
    KV head j are rows of one matmul against that head's keys. The mask (sdpa's: boolean, True =
    attend, or additive floats, one for all heads; or None) is read at the last query position.
    Returns ``[B, 1, H, D]``, as transformers' attention functions do. Anything else (a longer
    query, training, a mask per head, attention sinks, soft-capping) goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] != 1
    if length != 1 or module.training or heads % kv_heads or per_head_mask or kwargs.get("s_aux") is not None \
            or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = heads // kv_heads
    # k qᵀ rather than q kᵀ: the cache's keys are a view into a longer buffer, and matmul copies such
    # a view far faster as it lies than transposed (the product is the same, bit for bit)
    scores = torch.matmul(key, query.reshape(batch, kv_heads, groups, width).transpose(-1, -2)).transpose(-1, -2).float()
    scores.mul_(width**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, : key.shape[-2]].reshape(attention_mask.shape[0], 1, 1, -1)
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.float())
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, Hkv, g, D]
    return out.reshape(batch, 1, heads, width), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


ATTENTION_LAYERS = ("full_attention", "sliding_attention")  # layer types a plain KV cache serves


def attention_layers_only(config: Any) -> bool:
    """Whether every decoder layer of a model's ``config`` is an attention layer (``layer_types``,
    where the config has them): a plain KV cache of keys and values then holds its whole state."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return all(kind in ATTENTION_LAYERS for kind in getattr(text, "layer_types", None) or ())


def cache_argument(forward: Any) -> str:
    """The name a model's ``forward`` takes its KV cache by: transformers >= 5.2x says ``cache``,
    earlier 5.x ``past_key_values`` (also the attribute of the output that returns it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def applies(model: Any) -> bool:
    """Whether `decode_step` changes anything for ``model``: on a CPU, with sdpa attention, in eval
    mode, and every decoder layer an attention layer (``config.layer_types``, where the config has
    them: a model with linear-attention or state-space layers keeps the cache it makes for itself;
    a sliding-window layer keeps every token, and the mask it is given limits what it reads)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    config = model.config
    return (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa" and not model.training
            and attention_layers_only(config))


@contextlib.contextmanager
def decode_step(model: Any) -> Iterator[bool]:
    """While in the block, ``model`` computes one-token queries with `decode_attention` (yields
    True), where `applies`; elsewhere nothing changes (yields False)."""
    if not applies(model):
        yield False
        return
    _register()
    config = model.config
    config._attn_implementation = ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
