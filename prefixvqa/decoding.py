"""Decode steps for the greedy loop: one new token per row per step on top of a prefilled KV cache.

The greedy loop (`generation.greedy`) asks a *stepper* for the next logits of the rows still running and tells it
which rows to keep when some finish, so finished rows stop costing compute. Two steppers:

- `CachedStep` for decoders of the model types in `CACHED_STEP_TYPES` (Llama): the step runs the model's own
  submodules (norms, projections with any LoRA wrapper, rotary embedding, MLP, the configured attention function)
  over a KV cache preallocated for the whole answer. It skips what transformers' forward redoes every step (mask
  construction, cache concatenation, output objects) and computes the same numbers (`tests/test_decoding.py`
  compares both steppers bit for bit).
- `TransformersStep` for every other decoder: transformers' forward with its cache, one token at a time.

`stepper` picks one from the decoder's `config.model_type` and attention implementation.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

#: model types whose decoder layer is `x + attn(norm(x))`, `x + mlp(norm(x))` with rotary q/k, as Llama's
CACHED_STEP_TYPES = frozenset({"llama"})
#: attention implementations `CachedStep` builds masks for (boolean for SDPA, additive for eager)
CACHED_STEP_ATTENTION = frozenset({"sdpa", "eager"})


class TransformersStep:
    """One token per row through transformers' forward and its cache (any decoder)."""

    def __init__(self, lm: nn.Module, embed: nn.Module, dtype: torch.dtype, cache: Any, mask: torch.Tensor,
                 pos: torch.Tensor) -> None:
        self.lm, self.embed, self.dtype, self.cache, self.mask, self.pos = lm, embed, dtype, cache, mask, pos

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row (b,) -> next-token logits (b, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], 1)
        self.pos = self.pos + 1
        out = self.lm(inputs_embeds=self.embed(tokens[:, None]).to(self.dtype), attention_mask=self.mask,
                      position_ids=self.pos[:, None], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these running rows (indices into the current ones), in this order."""
        self.cache.reorder_cache(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]


class CachedStep:
    """One token per row for a Llama-type decoder over a preallocated KV cache (see the module docstring)."""

    def __init__(self, causal_lm: nn.Module, embed: nn.Module, dtype: torch.dtype, cache: Any, mask: torch.Tensor,
                 pos: torch.Tensor, new_tokens: int) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.lm, self.embed, self.dtype, self.pos = causal_lm, embed, dtype, pos
        body = causal_lm.model
        self.layers, self.norm, self.rotary = list(body.layers), body.norm, body.rotary_emb
        attn = self.layers[0].self_attn
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        impl = causal_lm.config._attn_implementation
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            impl, sys.modules[type(attn).__module__].eager_attention_forward)
        self.additive = impl == "eager"
        B, T = mask.shape
        self.t = T  # next cache position
        self.keys, self.values = [], []
        for layer in cache.layers:
            for store, past in ((self.keys, layer.keys), (self.values, layer.values)):
                buf = past.new_empty(*past.shape[:2], T + new_tokens, past.shape[-1])
                buf[:, :, :T] = past
                store.append(buf)
        self.valid = torch.zeros(B, T + new_tokens, dtype=torch.bool, device=mask.device)
        self.valid[:, :T] = mask.bool()

    @staticmethod
    def supports(causal_lm: nn.Module, cache: Any) -> bool:
        """Whether `CachedStep` can run this decoder with this prefilled cache."""
        config = getattr(causal_lm, "config", None)
        return (getattr(config, "model_type", None) in CACHED_STEP_TYPES
                and getattr(config, "_attn_implementation", None) in CACHED_STEP_ATTENTION
                and hasattr(causal_lm, "model") and hasattr(causal_lm, "lm_head")
                and all(hasattr(layer, "keys") and torch.is_tensor(layer.keys)
                        for layer in getattr(cache, "layers", [None])))

    def _mask(self, n: int) -> torch.Tensor | None:
        valid = self.valid[:, :n]
        if bool(valid.all()):
            return None  # as transformers: no padding, one query -> no mask
        mask = valid[:, None, None, :]
        if self.additive:
            return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        return mask

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per running row (b,) -> next-token logits (b, V)."""
        t, b = self.t, len(tokens)
        self.valid[:, t] = True
        self.pos = self.pos + 1
        mask = self._mask(t + 1)
        x = self.embed(tokens[:, None]).to(self.dtype)  # (b, 1, E)
        cos, sin = self.rotary(x, self.pos[:, None])
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
            out, _ = self.attention(attn, q, keys[:, :, :t + 1], values[:, :, :t + 1], mask, dropout=0.0,
                                    scaling=attn.scaling)
            x = x + attn.o_proj(out.reshape(b, 1, -1).contiguous())
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.t += 1
        return self.lm.lm_head(self.norm(x))[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these running rows (indices into the current ones), in this order."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid, self.pos = self.valid[rows], self.pos[rows]


def stepper(lm: nn.Module, embed: nn.Module, dtype: torch.dtype, cache: Any, mask: torch.Tensor, pos: torch.Tensor,
            new_tokens: int) -> TransformersStep | CachedStep:
    """The stepper for this decoder: `CachedStep` where it supports the decoder, else `TransformersStep`.
    `lm` is the module the loop calls (a peft wrapper or the causal LM); `new_tokens` the most tokens fed."""
    causal_lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if CachedStep.supports(causal_lm, cache):
        return CachedStep(causal_lm, embed, dtype, cache, mask, pos, new_tokens)
    return TransformersStep(lm, embed, dtype, cache, mask, pos)
