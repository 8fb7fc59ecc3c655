"""Tuning modes: what trains in the decoder, one registered class per method (peft's one-class-per-method pattern).

A mode carries its capabilities as class attributes (does it write peft's adapter files, place soft prompts, train
the base decoder, run on a quantised base, merge into base weights, shard under FSDP, which parameter groups train
by default, which earlier curriculum stage it may follow) and its behaviour as methods (the peft config, how it wraps
the decoder, where its virtual tokens go). Everything else asks the object (`config.tuning.method`); nothing compares
mode names. The JSON keeps the name (`tuning.mode`), so adapter folders written before this module still load.
`default_groups(cfg)` is the one rule for which parameter groups a model trains when nothing says otherwise.

Adding a peft method is one subclass plus `@register`. Heavy imports (torch, peft) happen inside the methods, so the
config layer can read the registry without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import AdapterConfig, ParamGroup, TuningConfig

# model types whose attention uses transformers' Conv1D (weights stored transposed); LoRA needs fan_in_fan_out there
FAN_IN_FAN_OUT = {"gpt2"}

# Default LoRA targets per transformers `model_type` (a config field, never a model-name substring).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "biogpt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt_neox": ["query_key_value"],
    "phi3": ["qkv_proj", "o_proj"],
}


class UnknownTuningMode(ConfigError):
    """A tuning mode name that no class is registered under."""


class TuningMode:
    """What trains in the decoder and how the decoder is wrapped for it. Subclasses set the attributes below."""

    name: ClassVar[str]
    uses_peft_files: ClassVar[bool] = False  # the folder holds peft's adapter_config.json + adapter_model.safetensors
    soft_prompt: ClassVar[bool] = False  # learned virtual tokens placed in front of every sequence (peft prompt tuning)
    trains_decoder: ClassVar[bool] = False  # the base decoder's own weights train and are stored in the adapter folder
    quantisable: ClassVar[bool] = True  # runs on a bitsandbytes 8/4-bit base (QLoRA)
    mergeable: ClassVar[bool] = False  # `export --merge` can write a plain decoder computing what this mode computes
    shardable: ClassVar[bool] = True  # FSDP may shard it
    shares_base: ClassVar[bool] = False  # several adapters of this mode can sit on one loaded base (the web app)
    folds_for_inference: ClassVar[bool] = False  # inference may fold its deltas into temporary base weights
    groups: ClassVar[tuple[ParamGroup, ...]] = ()  # decoder parameter groups it trains by default ("lora", "decoder")
    follows: ClassVar[tuple[str, ...]] = ("frozen",)  # modes an earlier curriculum stage may have used (besides itself)
    transformers_generate: ClassVar[bool] = True  # beams/sampling through transformers' generate (peft prefixes: no)

    def peft_config(self, model: nn.Module, tuning: TuningConfig) -> Any:
        """peft's config for this mode (None when peft is not involved)."""
        return None

    def wrap(self, model: nn.Module, tuning: TuningConfig) -> nn.Module:
        """The module the adapter calls: `model` itself, or peft's wrapper around it. Base weights train only when
        the mode trains the decoder."""
        for p in model.parameters():
            p.requires_grad_(self.trains_decoder)
        config = self.peft_config(model, tuning)
        if config is None:
            return model
        from peft import get_peft_model

        return get_peft_model(model, config)

    def language_model(self, decoder: nn.Module) -> nn.Module:
        """The module whose forward takes prepared inputs (peft's soft-prompt wrapper would add its tokens again)."""
        return decoder

    def place_virtual_tokens(self, decoder: nn.Module, tuning: TuningConfig, kwargs: dict[str, Any],
                             positions: torch.Tensor) -> dict[str, Any]:
        """First-call inputs with this mode's virtual tokens in place (nothing to do for weight-space methods)."""
        return kwargs

    def merged_base(self, decoder: nn.Module) -> nn.Module:
        """The plain decoder with what this mode learned folded in (a curriculum's switch to the next mode)."""
        return decoder

    def virtual_positions(self, tuning: TuningConfig) -> int:
        """Decoder positions this mode's virtual tokens take in front of every sequence (soft prompts shift the
        text's positions by this much): what the processor and generation subtract from the decoder's context."""
        return 0

    def can_follow(self, previous: TuningMode) -> bool:
        """Whether a curriculum stage in this mode may continue from one in `previous` without losing weights."""
        return previous.name == self.name or previous.name in self.follows

    def describe(self, tuning: TuningConfig) -> str:
        """The settings in one short phrase (preset tables, model cards)."""
        return self.name


TUNING_MODES: dict[str, TuningMode] = {}


def register(cls: type[TuningMode]) -> type[TuningMode]:
    """Class decorator: make a mode available by its `name` in configs, recipes, the CLI and the docs."""
    TUNING_MODES[cls.name] = cls()
    return cls


def get_tuning_mode(name: str) -> TuningMode:
    """The registered mode called `name`, or an error listing the known ones."""
    try:
        return TUNING_MODES[name]
    except KeyError:
        raise UnknownTuningMode(f"tuning.mode={name!r} is not one of {list(TUNING_MODES)}") from None


def default_groups(cfg: AdapterConfig) -> list[ParamGroup]:
    """The parameter groups a model built from `cfg` trains when nothing says otherwise: the encoder when it is not
    frozen, the mapper always, then the decoder groups of the tuning mode (`TuningMode.groups`). The one rule that
    training, recipes and fit-check read."""
    return [*(["encoder"] if not cfg.encoder.freeze else []), "mapper", *cfg.tuning.method.groups]


def lora_targets(model: nn.Module, tuning: TuningConfig) -> list[str]:
    """The modules LoRA wraps: the config's list, else the default for the decoder's `model_type`."""
    if tuning.target_modules:
        return list(tuning.target_modules)
    model_type = model.config.model_type
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ConfigError(f"no default LoRA target modules for model_type {model_type!r}; set tuning.target_modules "
                          f"(known defaults: {sorted(DEFAULT_LORA_TARGETS)})")
    return DEFAULT_LORA_TARGETS[model_type]


@register
class Frozen(TuningMode):
    """The decoder stays as loaded; only the mapper (and optionally the encoder) trains."""

    name = "frozen"
    mergeable = True  # nothing to fold: the export is the base decoder itself (a merged export is frozen again)
    follows = ()


@register
class Full(TuningMode):
    """Every decoder weight trains (LLaVA-Med's stages); the adapter folder then stores the decoder."""

    name = "full"
    trains_decoder = True
    quantisable = False
    mergeable = True
    groups = ("decoder",)
    follows = ("frozen", "lora", "dora")  # LoRA/DoRA are merged into the weights first


@register
class LoRA(TuningMode):
    """peft LoRA (QLoRA on a quantised base): low-rank deltas on the attention projections."""

    name = "lora"
    uses_peft_files = True
    mergeable = True
    shares_base = True
    folds_for_inference = True
    groups = ("lora",)

    def peft_config(self, model: nn.Module, tuning: TuningConfig) -> Any:
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=tuning.r, lora_alpha=tuning.alpha,
                          lora_dropout=tuning.dropout, target_modules=lora_targets(model, tuning), bias=tuning.bias,
                          fan_in_fan_out=model.config.model_type in FAN_IN_FAN_OUT, **self.extra_lora_args())

    def extra_lora_args(self) -> dict[str, Any]:
        """Further LoraConfig arguments of a LoRA variant."""
        return {}

    def merged_base(self, decoder: nn.Module) -> nn.Module:
        return decoder.merge_and_unload()

    def describe(self, tuning: TuningConfig) -> str:
        return f"LoRA r{tuning.r}/a{tuning.alpha}/p{tuning.dropout}"


@register
class DoRA(LoRA):
    """peft's weight-decomposed LoRA (Liu et al. 2024): LoRA's direction plus a learned magnitude per output row.

    Its inference cannot be a plain weight delta (the magnitude rescales the column norms), so it is not folded into
    temporary weights; peft merges it exactly when a curriculum or export asks."""

    name = "dora"
    folds_for_inference = False
    shares_base = False

    def extra_lora_args(self) -> dict[str, Any]:
        return {"use_dora": True}

    def describe(self, tuning: TuningConfig) -> str:
        return f"DoRA r{tuning.r}/a{tuning.alpha}/p{tuning.dropout}"


class _SoftPrompt(TuningMode):
    """peft's learned virtual tokens; prefixvqa places them itself so a KV cache can be reused."""

    uses_peft_files = True
    soft_prompt = True
    quantisable = False
    shardable = False
    groups = ("lora",)

    def language_model(self, decoder: nn.Module) -> nn.Module:
        return decoder.get_base_model()

    def virtual_positions(self, tuning: TuningConfig) -> int:
        return tuning.num_virtual_tokens

    def describe(self, tuning: TuningConfig) -> str:
        return f"{self.name} ({tuning.num_virtual_tokens} virtual tokens)"


@register
class PromptTuning(_SoftPrompt):
    """peft prompt tuning (Lester et al. 2021): learned input embeddings in front of the sequence."""

    name = "prompt_tuning"

    def peft_config(self, model: nn.Module, tuning: TuningConfig) -> Any:
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tuning.num_virtual_tokens)

    def place_virtual_tokens(self, decoder: nn.Module, tuning: TuningConfig, kwargs: dict[str, Any],
                             positions: torch.Tensor) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        embeds, mask, keep = kwargs["inputs_embeds"], kwargs["attention_mask"], kwargs["logits_to_keep"]
        B, V = embeds.shape[0], tuning.num_virtual_tokens
        prompt = decoder.get_prompt(batch_size=B).to(embeds.dtype)  # (B, V, E)
        arange = torch.arange(V, device=embeds.device).expand(B, V)
        return {**kwargs, "inputs_embeds": torch.cat([prompt, embeds], 1),
                "attention_mask": torch.cat([mask.new_ones(B, V), mask], 1),
                "position_ids": torch.cat([arange, positions + V], 1),
                "logits_to_keep": F.pad(keep, (V, 0)) if isinstance(keep, torch.Tensor) else keep}


@register
class PrefixTuning(_SoftPrompt):
    """peft prefix tuning (Li & Liang 2021): learned key/value prefixes in every layer (not the visual prefix)."""

    name = "prefix_tuning"
    transformers_generate = False

    def peft_config(self, model: nn.Module, tuning: TuningConfig) -> Any:
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tuning.num_virtual_tokens)

    def place_virtual_tokens(self, decoder: nn.Module, tuning: TuningConfig, kwargs: dict[str, Any],
                             positions: torch.Tensor) -> dict[str, Any]:
        import torch

        mask, V = kwargs["attention_mask"], tuning.num_virtual_tokens
        B = mask.shape[0]
        return {**kwargs, "attention_mask": torch.cat([mask.new_ones(B, V), mask], 1), "position_ids": positions + V,
                "past_key_values": decoder.get_prompt(B)}
