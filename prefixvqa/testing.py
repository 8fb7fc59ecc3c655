"""Tiny offline stand-ins for recipe smoke runs, examples and tests: a BPE tokenizer trained on the spot, random
decoders of each supported family, and a small open_clip tower. Nothing here downloads anything.

Why it ships in the package: a recipe's ``model.tiny: FAMILY`` (``prefixvqa train --smoke``) builds these at run
time. It sits below `train/` and imports none of it; helpers only tests use (fault injection, reference batches,
adapter tensor comparison) live in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_ENCODER: dict[str, Any] = {
    "backend": "open_clip", "revision": None, "layout": None, "final_norm": False, "name": "ViT-B-32",
    "pretrained": None,
    "model_overrides": {"embed_dim": 32,
                        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}},
}

# initializer_range 0.3 (not 0.02): with tied, frozen random embeddings a 32-wide model otherwise has near-uniform
# logits that LoRA cannot move, and learning tests could not tell a working adapter from a broken one.
TINY_DECODERS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512},
    "biogpt": {"model_type": "biogpt", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64, "max_position_embeddings": 512},
    # rotary models: the context is a config number, no weights (4096 as Llama 2 and Mistral; LLaVA templates fit)
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 4096},
    "mistral": {"model_type": "mistral", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 4096},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 4096,
                    "sliding_window": 512},
}
for _cfg in TINY_DECODERS.values():
    _cfg["initializer_range"] = 0.3

_CORPUS = ("question answer yes no left right lung heart liver kidney brain chest abdomen ct mri x-ray ultrasound "
           "is there a lesion in the image how many lesions which side what organ modality plane axial coronal "
           "normal abnormal fracture effusion pneumonia mass nodule present absent one two three four findings "
           "impression describe report the of and with without ? : . , ### human assistant context").split()


#: families whose real tokenizers open every text with a start token (Llama/Mistral <s>, BioGPT </s>); GPT-2 adds none
OPENS_WITH_START = ("llama", "mistral", "biogpt")


def build_tokenizer(folder: str | Path, vocab_size: int = 400, adds_start: bool = False) -> Any:
    """A byte-level BPE tokenizer with `<|endoftext|>` as BOS/EOS/UNK and no pad token (like GPT-2); with
    `adds_start` it puts BOS in front of every text itself, as Llama's and BioGPT's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [" ".join(_CORPUS[i:] + _CORPUS[:i]) for i in range(len(_CORPUS))]
    tok.train_from_iterator(text, trainer)
    if adds_start:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


# bitsandbytes' CPU kernels need in-features that are whole 64-element blocks (and out-features divisible by 32):
# the smallest decoders that can be quantised to 4-bit/8-bit and answer on CPU.
QUANT_SIZES: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_head": 2},
    "llama": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
    "mistral": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
}


def build_decoder(folder: str | Path, family: str, seed: int = 0, sizes: dict[str, Any] | None = None) -> Path:
    """Save a tiny random causal LM of `family` with the tiny tokenizer into `folder` (a real local model folder).

    `sizes` overrides config fields (e.g. `QUANT_SIZES[family]`). The weights depend only on `seed` and the sizes;
    the caller's torch random state is left as it was.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .rng import seeded

    folder = Path(folder)
    tok = build_tokenizer(folder, adds_start=family in OPENS_WITH_START)
    cfg = AutoConfig.for_model(**{**TINY_DECODERS[family], **(sizes or {}), "vocab_size": len(tok),
                                  "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    return folder


def tiny_overrides(decoder_folder: str | Path) -> dict[str, Any]:
    """Overrides that turn any preset into a tiny offline model (keeps the preset's mapper/tuning/template)."""
    return {"encoder": dict(TINY_ENCODER), "decoder": {"name": str(decoder_folder), "quantization": None,
                                                       "gguf_file": None, "model_config": None, "dtype": "float32",
                                                       "layout": None, "release": None, "revision": None},
            "mapper": {"hidden_dim": None, "heads": 2}, "template": {"max_length": 256}}


# Tiny transformers image towers (the `encoder.backend: transformers` path) with the image processor their real
# checkpoints ship: CLIP (LLaVA's tower), SigLIP (MedSigLIP), DINOv2 with a BiT processor (RAD-DINO).
TINY_TOWERS: dict[str, dict[str, Any]] = {
    "clip": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 16},
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    "dinov2": {"model_type": "dinov2", "hidden_size": 32, "mlp_ratio": 2, "num_hidden_layers": 3,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
}


def tower_image_processor(kind: str, size: int = 32) -> Any:
    """The image processor class each tower's real checkpoints use, at `size` pixels: CLIP's (shortest side, centre
    crop, OpenAI mean), SigLIP's (square resize, mean 0.5), RAD-DINO's BiT processor (shortest side, crop)."""
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if kind == "siglip":
        return SiglipImageProcessor(size={"height": size, "width": size})
    return BitImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                             image_mean=[0.5307, 0.5307, 0.5307], image_std=[0.2583, 0.2583, 0.2583])


def build_vision_tower(folder: str | Path, kind: str = "clip", seed: int = 0, sizes: dict[str, Any] | None = None
                       ) -> Path:
    """Save a tiny random transformers image tower of `kind` (TINY_TOWERS) with its image processor into `folder`:
    a local folder `encoder.backend: transformers` loads by path."""
    from transformers import AutoConfig, AutoModel

    from .rng import seeded

    folder = Path(folder)
    cfg = AutoConfig.for_model(**{**TINY_TOWERS[kind], **(sizes or {})})
    with seeded(seed):
        model = AutoModel.from_config(cfg)
    model.save_pretrained(str(folder))
    tower_image_processor(kind, cfg.image_size).save_pretrained(str(folder))
    return folder


def tiny_tower_encoder(folder: str | Path, **fields: Any) -> dict[str, Any]:
    """An `encoder` config section for a tower saved by `build_vision_tower` (patch features by default)."""
    return {"backend": "transformers", "name": str(folder), "pretrained": None, "image_size": None,
            "model_overrides": {}, "features": "patches", "layer": -2, **fields}
