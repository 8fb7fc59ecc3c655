"""The `gemma3` layout (MedGemma, `google/medgemma-4b-it`): transformers' Gemma3ForConditionalGeneration checkpoint as
an ordinary adapter, computed as transformers' modeling_gemma3.py / processing_gemma3.py compute it:

* tower: the SiglipVisionModel of `vision_config`, its `last_hidden_state` (every block, then `post_layernorm`):
  `encoder.final_norm`, read out of the checkpoint's `vision_tower.*` tensors;
* projector: mapper kind `gemma3` (mappers.py): average pooling of the patch grid to `mm_tokens_per_image` tokens,
  Gemma's RMSNorm (`mm_soft_emb_norm`), the matrix `mm_input_projection_weight`, loaded from the checkpoint;
* language model: Gemma3ForCausalLM of `text_config` (its embeddings scaled by sqrt(hidden_size) inside the embedding
  module, so the image vectors, written over the image tokens' embeddings, are not scaled, as in transformers);
* attention: causal, except that the tokens of one image attend to each other both ways (transformers' token_type_ids
  rule, `get_block_sequence_ids_for_mask`; here from the processor's image_mask), on full and sliding layers alike,
  the sliding window applied after (`image_attention_masks`);
* template `gemma3`: the chat turns with `\\n\\n<start_of_image>` + image tokens + `<end_of_image>\\n\\n` where
  Gemma3Processor expands the image.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import AdapterConfig
from .vlm_layouts import LayoutError, read_tensors, require

__all__ = ["gemma3_config", "gemma3_projector_state", "image_attention_masks", "GEMMA3_LORA_TARGETS"]

#: Gemma's linear layers (the MedGemma fine-tuning notebook's "all-linear" on the language model)
GEMMA3_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gemma3_config(source: str, revision: str | None, config: dict, path: Any) -> AdapterConfig:
    """The AdapterConfig of a Gemma3ForConditionalGeneration checkpoint (see the module docstring)."""
    require(config, path, "vision_config", "text_config", "mm_tokens_per_image")
    vision = config["vision_config"]
    eps = vision.get("layer_norm_eps", 1e-6)
    if eps != 1e-6:
        raise LayoutError(f"{path}: vision_config.layer_norm_eps={eps}: the gemma3 mapper's norm uses 1e-6")
    if vision.get("vision_use_head", False):
        raise LayoutError(f"{path}: vision_config.vision_use_head=true: Gemma 3 reads the tower without its head")
    return AdapterConfig.from_dict({
        "encoder": {"backend": "transformers", "name": source, "revision": revision, "layout": "gemma3",
                    "features": "patches", "layer": -1, "final_norm": True},
        "mapper": {"kind": "gemma3", "prefix_length": int(config["mm_tokens_per_image"])},
        "decoder": {"name": source, "revision": revision, "layout": "gemma3", "dtype": "bfloat16"},
        "tuning": {"mode": "lora", "r": 16, "alpha": 16, "dropout": 0.05, "target_modules": GEMMA3_LORA_TARGETS},
        "template": {"name": "gemma3", "image_position": "before_question", "max_length": 2048},
        "generation": {"max_new_tokens": 512},
        "name": "from_vlm:gemma3", "description": f"imported from {source} (gemma3 layout)"})


def gemma3_projector_state(source: str, revision: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's `multi_modal_projector` tensors, named as the gemma3 mapper names them."""
    found = read_tensors(source, r"^(model\.)?multi_modal_projector\.", revision)
    out = {}
    for key, value in found.items():
        if key.endswith("mm_input_projection_weight"):
            out["mm_input_projection_weight"] = value.float()
        elif key.endswith("mm_soft_emb_norm.weight"):
            out["mm_soft_emb_norm"] = value.float()
    if len(out) != 2:
        raise LayoutError(f"{source}: multi_modal_projector.mm_input_projection_weight / mm_soft_emb_norm.weight "
                          f"missing from its weight files (found {sorted(found)})")
    return out


def image_attention_masks(decoder_config: Any, mask: torch.Tensor, image_mask: torch.Tensor, dtype: torch.dtype
                          ) -> dict[str, torch.Tensor]:
    """Gemma 3's masks for a prompt (B, T) with image slots `image_mask` (B, T): {"full_attention": OR(causal,
    same image), "sliding_attention": AND(that, the sliding window)}, padding keys masked, in the format the
    attention implementation takes (`data.packing.mask_for_attention`). A padding query attends to itself only (its
    output is never read; no row is empty)."""
    from .data.packing import mask_for_attention

    B, T = mask.shape
    device = mask.device
    image = image_mask.to(device).bool()
    previous = torch.nn.functional.pad(image, (1, 0))[:, :-1]
    group = torch.cumsum((image & ~previous).int(), 1) - 1
    block = torch.where(image, group, torch.full_like(group, -1))  # each image's run of tokens, -1 for text
    same_image = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    q = torch.arange(T, device=device)
    causal = q[None, :, None] >= q[None, None, :]
    valid = mask.bool()
    allowed = (causal | same_image) & valid[:, None, :]
    lone = ~valid[:, :, None] & torch.eye(T, dtype=torch.bool, device=device)[None]
    full = allowed | lone
    window = getattr(decoder_config, "sliding_window", None)
    sliding = full if not window else (allowed & (q[None, None, :] > q[None, :, None] - window)) | lone
    return {"full_attention": mask_for_attention(decoder_config, full, dtype),
            "sliding_attention": mask_for_attention(decoder_config, sliding, dtype)}
