"""The image side: an open_clip image tower that returns pooled embeddings (B, 1, D) or patch tokens (B, N, D) (a
registered open_clip name, an "hf-hub:" repo, or a model config file as LLaVA-Rad ships its tower).

`VisionEncoder(visual, preprocess, cfg)` only wraps modules it is given; `VisionEncoder.from_config` does the loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .errors import PrefixVQAError
from .rng import seeded
from .config import ConfigError, EncoderConfig

log = logging.getLogger(__name__)


class ModelNotAvailableError(PrefixVQAError, RuntimeError):
    """Weights or a config are not reachable (offline, or a wrong path); the message names what is needed."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set now. Read at each call (huggingface_hub reads it once, at import), so the checks
    that fail fast with a message instead of a download attempt follow a variable set after import too."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def require_hub_file(repo_id: str, filename: str, what: str, revision: str | None = None) -> None:
    """Fail fast, before any library call, when a hub file is neither cached nor downloadable (offline)."""
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(found, str):
        raise ModelNotAvailableError(
            f"{what} needs the hub repo '{repo_id}' ({filename}), which is not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. Download it on a connected machine "
            f"(`huggingface-cli download {repo_id}`) or point the config at a local copy.")


class VisionEncoder(nn.Module):
    """Wraps an open_clip image tower; returns (B, 1, D) pooled or (B, N, D) patch tokens from `cfg.layer`.

    Speed paths (features are unchanged, see tests/test_vision_speed_path.py and benchmarks/bench_vision_tower.py):
    - patch features from an intermediate block run only the blocks up to that one;
    - a tower that needs no grad (frozen, or grad disabled) gets pixels in its own parameter dtype and returns
      float32; one whose blocks attend with nn.MultiheadAttention (open_clip's ViT) runs outside autocast, where
      that module keeps its fused kernel (under CPU autocast it falls back to a path ~4x slower). Conv towers keep
      the caller's autocast (bf16 convolutions are faster). `to_compute_dtype(torch.bfloat16)` casts a frozen
      tower's weights: the fastest path for bf16 runs;
    - a plain open_clip ViT that trains runs its blocks with F.scaled_dot_product_attention on batch-first q/k/v
      (the same numbers as nn.MultiheadAttention's own slow path, without its transposes).
    """

    def __init__(self, visual: nn.Module, preprocess: Callable[[Any], torch.Tensor], cfg: EncoderConfig):
        super().__init__()
        self.visual, self.preprocess, self.cfg = visual, preprocess, cfg
        self._plain_vit, self._stop_early = _is_plain_vit(visual), _stop_early_flag(visual)
        self._mha = any(isinstance(m, nn.MultiheadAttention) for m in visual.modules())

    @classmethod
    def from_config(cls, cfg: EncoderConfig, dtype: torch.dtype | str | None = None) -> "VisionEncoder":
        """Build the tower; `dtype` (e.g. torch.bfloat16) casts a frozen one (cfg.freeze) for that compute dtype."""
        import open_clip

        (check_config_file_tower if cfg.backend == "open_clip_file" else check_encoder_available)(cfg)
        if cfg.backend == "open_clip_file":  # an open_clip model config file (LLaVA-Rad's BiomedCLIP-CXR-518)
            visual, preprocess = tower_from_config_file(cfg)
        else:
            kwargs: dict[str, Any] = dict(cfg.model_overrides)
            if cfg.image_size:
                kwargs["force_image_size"] = cfg.image_size
            with seeded(cfg.init_seed):  # pretrained=None rebuilds the same random tower; the caller's stream kept
                try:
                    model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=cfg.pretrained,
                                                                                 **kwargs)
                except (RuntimeError, OSError, ValueError) as exc:
                    raise ModelNotAvailableError(f"open_clip could not build encoder {cfg.name!r} with "
                                                 f"pretrained={cfg.pretrained!r}: {exc}") from exc
            visual = model.visual
            del model  # the text tower is never used
        if cfg.image_aspect_ratio == "pad":
            from .data.transforms import PadToSquare

            preprocess = PadToSquare.around(preprocess)
        encoder = cls(visual, preprocess, cfg)
        if dtype is not None:
            if cfg.freeze:
                visual.requires_grad_(False)
            encoder.to_compute_dtype(dtype)
        return encoder

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the tower's floating-point weights (what its frozen path computes in)."""
        return next((p.dtype for p in self.visual.parameters() if p.dtype.is_floating_point), torch.float32)

    def to_compute_dtype(self, dtype: torch.dtype | str) -> "VisionEncoder":
        """Cast a frozen tower's weights to `dtype` (bf16 runs: half the memory, faster matmuls); returns self.

        A tower that trains (cfg.freeze False, or any parameter requiring grad) keeps float32 master weights and
        is left as it is: autocast handles its compute. Casting back to float32 is always allowed (do that before
        unfreezing a tower that was cast).
        """
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"to_compute_dtype needs a floating-point torch dtype, got {dtype!r}")
        trains = not self.cfg.freeze or any(p.requires_grad for p in self.visual.parameters())
        if trains and dtype != torch.float32:
            log.info("encoder trains: keeping float32 weights instead of casting to %s", dtype)
            return self
        self.visual.to(dtype)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, D)
        """Features of a batch; float32 when no grad is needed (frozen tower or grad disabled)."""
        if self._needs_grad(pixels):
            return self._features(pixels, trains=True)
        # nn.MultiheadAttention's fused inference kernel refuses to run under autocast: switch it off for such towers
        amp = torch.autocast(pixels.device.type, enabled=False) if self._mha else contextlib.nullcontext()
        with amp:
            return self._features(pixels.to(self.compute_dtype), trains=False).float()

    def _needs_grad(self, pixels: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return pixels.requires_grad or any(p.requires_grad for p in self.visual.parameters())

    def _features(self, pixels: torch.Tensor, trains: bool) -> torch.Tensor:
        if self.cfg.features == "pooled":
            return self.visual(pixels).unsqueeze(1)  # (B, 1, D)
        if trains and self._plain_vit:
            return self._vit_tokens_sdpa(pixels)
        # NCHW is the one layout every open_clip tower (ViT, ModifiedResNet, timm) can return; a conv grid becomes
        # h*w tokens in row-major order, the same order a ViT's NLC output has.
        out = self.visual.forward_intermediates(pixels, indices=[self.cfg.layer], intermediates_only=True,
                                                stop_early=self._stop_early, output_fmt="NCHW",
                                                output_extra_tokens=self.cfg.keep_cls)
        tokens = out["image_intermediates"][0].flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        if self.cfg.keep_cls and out.get("image_intermediates_prefix"):
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens

    def _vit_tokens_sdpa(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens (with the class token first when keep_cls) of a plain ViT, run up to block `cfg.layer`."""
        transformer = self.visual.transformer
        blocks = transformer.resblocks
        last = self.cfg.layer + len(blocks) if self.cfg.layer < 0 else self.cfg.layer
        if not 0 <= last < len(blocks):
            raise ConfigError(f"encoder.layer={self.cfg.layer} is out of range for a tower of {len(blocks)} blocks")
        x = self.visual._embeds(pixels)  # (B, 1 + N, D): class token, then patches
        for block in blocks[:last + 1]:
            if transformer.grad_checkpointing:
                x = checkpoint(_sdpa_block, block, x, use_reentrant=False)
            else:
                x = _sdpa_block(block, x)
        return x if self.cfg.keep_cls else x[:, 1:]

    @torch.no_grad()
    def output_shape(self) -> tuple[int, int]:
        """(N, D) of one image's features, from one dry run (works for any tower open_clip builds)."""
        size = self.preprocess_size()
        was = self.training
        self.eval()
        out = self(torch.zeros(1, 3, *size, device=next(self.parameters()).device))
        self.train(was)
        return out.shape[1], out.shape[2]

    def leading_tokens(self, n: int) -> int:
        """How many of `n` feature tokens come before the patch grid (the class token kept by `keep_cls`): what
        grounding maps skip to lay the patches out on the image."""
        return 1 if self.cfg.keep_cls and self.cfg.features == "patches" else 0

    def preprocess_size(self) -> tuple[int, int]:
        """(height, width) in pixels the tower takes (open_clip's `visual.image_size`, 224 where a tower does not
        say): the size of the dry run in `output_shape` and of fit-check's pixel batch."""
        size = getattr(self.visual, "image_size", 224)
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _is_plain_vit(visual: nn.Module) -> bool:
    """An open_clip VisionTransformer of default blocks with batch-first self-attention (what _sdpa_block runs)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(visual) is not VisionTransformer or not visual.transformer.batch_first or not hasattr(visual, "_embeds"):
        return False  # _embeds: open_clip's patch, class and position embedding step, reused below
    for block in visual.transformer.resblocks:
        attn = block.attn
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") or not attn.batch_first:
            return False
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def _sdpa_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on (B, L, D) with scaled_dot_product_attention for its self-attention."""
    x = x + block.ls_1(_sdpa_self_attention(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _sdpa_self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(x, x, x) without a mask, from its own weights, on batch-first (B, L, D)."""
    batch, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if attn.training else 0.0)
    return F.linear(out.transpose(1, 2).reshape(batch, length, width), attn.out_proj.weight, attn.out_proj.bias)


def _stop_early_flag(visual: nn.Module) -> bool:
    """forward_intermediates' `stop_early` value that skips the blocks after the one read.

    open_clip 3.3.0's ModifiedResNet inverts the flag: it truncates its stages when stop_early is False.
    """
    from open_clip.modified_resnet import ModifiedResNet

    return not isinstance(visual, ModifiedResNet)


def check_encoder_available(cfg: EncoderConfig) -> None:
    """Raise ModelNotAvailableError naming the weights/config file an encoder needs when it cannot be had offline."""
    import open_clip

    if cfg.name.startswith("hf-hub:"):
        require_hub_file(cfg.name[len("hf-hub:"):], "open_clip_config.json", f"encoder {cfg.name!r}")
        return
    if cfg.name not in open_clip.list_models():
        raise ModelNotAvailableError(f"encoder.name={cfg.name!r} is not an open_clip model; "
                                     "see open_clip.list_models()")
    if cfg.pretrained is None:
        return
    if Path(cfg.pretrained).suffix or os.sep in cfg.pretrained:  # a checkpoint file, not a tag
        if not Path(cfg.pretrained).is_file():
            raise ModelNotAvailableError(f"encoder.pretrained checkpoint not found: {cfg.pretrained}")
        return
    tag_cfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained)
    if not tag_cfg:
        raise ModelNotAvailableError(f"open_clip has no pretrained tag {cfg.pretrained!r} for {cfg.name!r}; "
                                     f"known: {open_clip.list_pretrained_tags_by_model(cfg.name)}")
    if tag_cfg.get("hf_hub"):
        repo = tag_cfg["hf_hub"].rstrip("/")
        filename = "open_clip_model.safetensors"
        from huggingface_hub import try_to_load_from_cache

        if hub_offline() and not any(isinstance(try_to_load_from_cache(repo, f), str)
                                     for f in (filename, "open_clip_pytorch_model.bin")):
            raise ModelNotAvailableError(
                f"encoder {cfg.name!r} pretrained={cfg.pretrained!r} needs weights from the hub repo '{repo}', which "
                f"is not cached and HF_HUB_OFFLINE=1 forbids downloading. Download it on a connected machine or set "
                f"encoder.pretrained to a local checkpoint file (or null for random weights).")
    elif hub_offline():
        raise ModelNotAvailableError(f"encoder {cfg.name!r} pretrained={cfg.pretrained!r} downloads from "
                                     f"{tag_cfg.get('url')}; offline, set encoder.pretrained to a local checkpoint "
                                     "file")


# --- an open_clip tower given by a model config file -----------------------------------------------------------
# What LLaVA-Rad ships for its BiomedCLIP-CXR-518 tower (biomedclipcxr_518.json: a timm DINOv2 ViT-B/14 trunk at
# 518 px; weights in biomedclipcxr_518_checkpoint.pt): `encoder.name` is the JSON file, `encoder.pretrained` the
# checkpoint, each a local path or org/repo/file on the hub. Only the image tower is built, with open_clip's own
# `_build_vision_tower` (what `create_model` uses), so a text tower naming a Hugging Face model needs nothing; the
# checkpoint's visual.* tensors load strictly; preprocessing is open_clip's eval transform for the config's
# preprocess_cfg (defaults: OpenAI mean/std, bicubic, shortest-side resize, centre crop), as create_model_from_pretrained.
def resolve_file(ref: str) -> Path:
    """A local file, or `org/repo/path/in/repo` from the Hugging Face Hub (offline: the cache only)."""
    local = Path(ref).expanduser()
    if local.is_file():
        return local
    parts = ref.split("/")
    if len(parts) < 3 or ref.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"file not found: {ref} (give a local path or org/repo/file on the hub)")
    from .vlm_layouts import LayoutError, checkpoint_file

    try:
        return checkpoint_file("/".join(parts[:2]), "/".join(parts[2:]))
    except LayoutError as exc:
        raise ModelNotAvailableError(str(exc)) from None


def check_config_file_tower(cfg: EncoderConfig) -> None:
    """Both files reachable (the config, and the checkpoint unless random weights are asked for)."""
    resolve_file(cfg.name)
    if cfg.pretrained is not None:
        resolve_file(cfg.pretrained)


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tower_from_config_file(cfg: EncoderConfig) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """(image tower, eval transform) of the open_clip config file `cfg.name` with the weights of `cfg.pretrained`."""
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg, image_transform_v2

    path = resolve_file(cfg.name)
    model_cfg = _merged(json.loads(path.read_text()), cfg.model_overrides)
    vision_cfg = dict(model_cfg["vision_cfg"])
    timm_trunk = bool(vision_cfg.get("timm_model_name"))
    if cfg.image_size and not timm_trunk:
        vision_cfg["image_size"] = cfg.image_size
    with seeded(cfg.init_seed):
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, model_cfg.get("quick_gelu", False))
    if cfg.pretrained is not None:
        from .vlm_layouts import load_tensor_file

        state = load_tensor_file(resolve_file(cfg.pretrained))
        state = state.get("state_dict", state)
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
        own = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        try:
            visual.load_state_dict(own)
        except RuntimeError as exc:
            raise ModelNotAvailableError(f"{cfg.pretrained}: its visual.* tensors do not fit {path}: {exc}") from None
    if cfg.image_size and timm_trunk:  # as open_clip's force_image_size: the timm trunk resized after loading
        visual.set_input_size(cfg.image_size)
    size = cfg.image_size or vision_cfg.get("image_size", 224)
    preprocess = image_transform_v2(PreprocessCfg(size=size, **model_cfg.get("preprocess_cfg", {})), is_train=False)
    return visual.eval(), preprocess
