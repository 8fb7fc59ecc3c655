"""Typed configuration: one dataclass per part, nested into one `AdapterConfig` that round-trips through JSON.

Every field is plain JSON data so an adapter folder's `prefixvqa_config.json` is enough to rebuild the model.
Validation happens in `__post_init__` so a bad combination fails where it is written, not deep inside a library.

Each closed set of allowed values is spelled once, as a `typing.Literal` type that annotates its field: validation
(`coerce`) reads it with `typing.get_args`, and the module-level tuples below (`MAPPER_KINDS`, `DTYPES`, ...) are
what the CLI's `choices=` and the docs read. Open sets live in registries: tuning modes (`tuning.TUNING_MODES`),
mapper capabilities (`mappers.MAPPERS`, whose names a test keeps equal to `MAPPER_KINDS`), prompt templates.
This module stays import-light: torch loads only when a config naming a mapper kind is validated.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from .errors import ConfigError  # noqa: F401 (re-exported: `from prefixvqa.config import ConfigError`)
from .errors import shorten
from .tuning import DEFAULT_LORA_TARGETS, TUNING_MODES, TuningMode, get_tuning_mode  # noqa: F401 (re-exported)

FeatureKind = Literal["pooled", "patches"]  # "pooled" -> (B, 1, D); "patches" -> (B, N, D)
EncoderBackend = Literal["open_clip", "open_clip_file", "transformers"]  # who builds the tower (encoders.BACKENDS)
VLMLayout = Literal["llava", "llava_lora", "llava_hf", "gemma3"]  # how a released VLM checkpoint is laid out
AspectRatio = Literal["square", "pad"]  # LLaVA's image_aspect_ratio: the processor's own resize, or pad to square first
MapperKind = Literal["linear", "mlp", "mlp2x_gelu", "transformer", "resampler", "query_decoder", "gemma3"]
Activation = Literal["tanh", "gelu", "relu", "silu"]
Quantization = Literal["8bit", "4bit"]  # bitsandbytes LLM.int8 / NF4 (QLoRA); None = full precision
DType = Literal["float32", "bfloat16", "float16"]
ImagePosition = Literal["before_question", "after_question"]
TemplateStart = Literal["tokenizer", "bos", "none"]
TuningBias = Literal["none", "all", "lora_only"]  # peft LoraConfig.bias
ParamGroup = Literal["encoder", "mapper", "lora", "decoder"]  # "lora" holds every peft tensor (LoRA or soft prompts)

FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
VLM_LAYOUTS: tuple[str, ...] = get_args(VLMLayout)
MAPPER_KINDS: tuple[str, ...] = get_args(MapperKind)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
QUANTIZATIONS: tuple[str | None, ...] = (None, *get_args(Quantization))
DTYPES: tuple[str, ...] = get_args(DType)
IMAGE_POSITIONS: tuple[str, ...] = get_args(ImagePosition)
TEMPLATE_STARTS: tuple[str, ...] = get_args(TemplateStart)
TUNING_BIASES: tuple[str, ...] = get_args(TuningBias)
PARAM_GROUPS: tuple[str, ...] = get_args(ParamGroup)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{section}.{name}={shorten(value)} is not one of {list(allowed)}")


# --- declared types -------------------------------------------------------------------------------------------------
def _options(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def allowed_values(hint: Any) -> tuple[Any, ...] | None:
    """The closed set a `Literal` (optionally `| None`) declares, in declaration order; None for open types."""
    literals = [option for option in _options(hint) if typing.get_origin(option) is Literal]
    if not literals:
        return None
    values = tuple(v for option in literals for v in get_args(option))
    return values + ((None,) if type(None) in _options(hint) else ())


def describe_type(hint: Any) -> str:
    """A declared type in words ("an integer or null", "one of ['a', 'b']") for error messages."""
    allowed = allowed_values(hint)
    if allowed is not None:
        return f"one of {list(allowed)}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    parts = []
    for option in _options(hint):
        origin = typing.get_origin(option) or option
        parts.append(names.get(option) or {list: "a list", dict: "a mapping"}.get(origin, getattr(option, "__name__",
                                                                                                str(option))))
    return " or ".join(parts)


def _same(value: Any, allowed: Any) -> bool:
    return value == allowed and type(value) is type(allowed)  # True is not 1, 1 is not 1.0


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the declared type ``hint``, or a ConfigError naming ``where``.

    Only lossless conversions: an int where a float is declared, and a numeric string where a number is declared
    (YAML 1.1 reads ``1e-3`` without a dot as a string). Booleans are never numbers. A `Literal` accepts exactly
    its values (the one place each closed set of allowed values is spelled).
    """
    if hint is Any:
        return value
    for option in _options(hint):
        origin, args = typing.get_origin(option), typing.get_args(option)
        if option is type(None) and value is None:
            return None
        if origin is Literal and any(_same(value, a) for a in args):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, (list, tuple)):
            return [coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            kt, vt = args or (Any, Any)
            return {coerce(k, kt, where): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, str) and float in _options(hint):
        try:
            return float(value)
        except ValueError:
            pass
    allowed = allowed_values(hint)
    words = str in _options(hint) or any(isinstance(v, str) for v in allowed or ())
    if isinstance(value, bool) and words:
        raise ConfigError(f"{where}={value!r}: expected {describe_type(hint)} (YAML reads an unquoted no/yes/off/on "
                          f"as a boolean: quote it, e.g. '{'yes' if value else 'no'}')")
    if allowed is not None:
        raise ConfigError(f"{where}={shorten(value)} is not one of {list(allowed)}")
    raise ConfigError(f"{where}={shorten(value)}: expected {describe_type(hint)}")


def check_types(obj: Any, section: str) -> None:
    """Coerce every field of the dataclass ``obj`` to its declared type in place (see :func:`coerce`)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))


@dataclass
class EncoderConfig:
    """The image tower. `backend` "open_clip": `name` is an open_clip model name or "hf-hub:org/repo" and
    `pretrained` a tag ("openai"), a local checkpoint file, or None for random weights. "open_clip_file": `name` is
    an open_clip model config JSON and `pretrained` its checkpoint (each a path or org/repo/file; LLaVA-Rad's
    tower). `backend` "transformers":
    `name` is a hub id or local folder of a transformers image model (CLIPVisionModel, SiglipVisionModel, Dinov2Model,
    any AutoModel backbone with hidden states) with its image processor; `revision` pins a hub revision."""

    name: str = "ViT-B-32"  # open_clip model name or "hf-hub:org/repo"; transformers: hub id or folder
    pretrained: str | None = None
    features: FeatureKind = "pooled"  # "pooled" -> (B, 1, D); "patches" -> (B, N, D)
    layer: int = -1  # transformer block whose patch tokens are used (-2 = LLaVA's penultimate layer)
    keep_cls: bool = False  # keep the class token (and any register tokens) in front of the patch tokens
    image_size: int | None = None  # force a different input resolution
    model_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the model config
    init_seed: int = 0  # random init is seeded so pretrained=None rebuilds the same weights
    freeze: bool = True
    backend: EncoderBackend = "open_clip"
    revision: str | None = None  # transformers backend: the hub revision of `name`
    image_aspect_ratio: AspectRatio = "square"  # "pad": pad to a square with the mean colour first (LLaVA's "pad")
    layout: VLMLayout | None = None  # "llava_hf" / "gemma3": the tower inside that transformers folder `name`
    # the tower's output after its final norm (the model's last_hidden_state, as Gemma 3 reads SigLIP); needs layer -1
    final_norm: bool = False

    def __post_init__(self) -> None:
        check_types(self, "encoder")
        _check(bool(self.name), "encoder.name must name the tower: an open_clip model name or 'hf-hub:' id, or a "
                                "transformers hub id or folder (encoder.backend='transformers')")
        if self.backend == "transformers":
            _check(self.pretrained is None, "encoder.pretrained is an open_clip setting; the transformers backend "
                                            "loads the weights of encoder.name (pin them with encoder.revision)")
            _check(self.image_size is None, "encoder.image_size is an open_clip setting; the transformers backend "
                                            "takes the size its image processor gives")
            _check(self.layout in (None, "llava_hf", "gemma3"),
                   "encoder.layout: only 'llava_hf' and 'gemma3' hold a tower inside them")
            _check(not self.final_norm or (self.layer == -1 and self.features == "patches"),
                   "encoder.final_norm reads the tower's last_hidden_state: set encoder.layer=-1, features='patches'")
        else:
            _check(self.revision is None and self.layout is None and not self.final_norm,
                   "encoder.revision, layout and final_norm apply to encoder.backend='transformers'")


@dataclass
class MapperConfig:
    """Features (B, N, D_v) -> prefix (B, L, E). `in_dim`/`out_dim` are filled from the encoder/decoder at build."""

    kind: MapperKind = "mlp"
    prefix_length: int = 8  # L for mlp/transformer/resampler/query_decoder; linear/mlp2x_gelu: one per input token
    hidden_dim: int | None = None  # mlp: first hidden width (default L*E/2); attention mappers: their width (E)
    depth: int = 2  # mlp: linear layers; attention mappers: layers
    heads: int = 8
    head_dim: int | None = None  # attention inner width per head; None -> width / heads (Flamingo's perceiver: 64)
    mlp_ratio: float = 4.0  # attention mappers' feed-forward width / model width (ClipCap 2, MedVInT 1)
    input_tokens: int | None = None  # transformer: tokens one pooled vector is expanded to (ClipCap's clip_length)
    activation: Activation = "tanh"
    dropout: float = 0.0
    in_dim: int | None = None
    out_dim: int | None = None

    def __post_init__(self) -> None:
        check_types(self, "mapper")
        _check(self.prefix_length >= 1, f"mapper.prefix_length must be >= 1, got {self.prefix_length}")
        _check(self.depth >= 1, f"mapper.depth must be >= 1, got {self.depth}")
        _check(0.0 <= self.dropout < 1.0, f"mapper.dropout must be in [0, 1), got {self.dropout}")
        _check(self.heads >= 1, f"mapper.heads must be >= 1, got {self.heads}")
        _check(self.mlp_ratio > 0, f"mapper.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.input_tokens is None or self.input_tokens >= 1, "mapper.input_tokens must be >= 1")


@dataclass
class DecoderConfig:
    """A transformers causal LM: hub id or local folder (`name`), optionally a GGUF file inside it or given by path.

    `model_config` builds random weights from a config dict instead of loading any (tiny offline test models).
    """

    name: str = "gpt2"
    revision: str | None = None
    gguf_file: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None  # tokenizer source when it differs from `name`
    dtype: DType = "float32"
    quantization: Quantization | None = None
    gradient_checkpointing: bool = False
    init_seed: int = 0
    # a released vision-language checkpoint's language model (prefixvqa/vlm_layouts.py): "llava" reads it out of
    # the LLaVA checkpoint `name`; "llava_hf" / "gemma3" out of a LlavaForConditionalGeneration /
    # Gemma3ForConditionalGeneration folder (gemma3: image tokens attend both ways); "llava_lora" is `name`
    # (the base LM) with the LoRA of the release `release` merged in, as LLaVA's builder loads LoRA releases
    layout: VLMLayout | None = None
    release: str | None = None

    def __post_init__(self) -> None:
        check_types(self, "decoder")
        _check((self.layout == "llava_lora") == (self.release is not None),
               "decoder.release (a LoRA release folder or hub id) goes with decoder.layout='llava_lora', and only there")
        _check(not (self.layout and (self.model_config is not None or self.gguf_file)),
               "decoder.layout reads a released checkpoint; it cannot be combined with decoder.model_config or gguf_file")
        _check(self.model_config is None or "model_type" in self.model_config,
               "decoder.model_config needs a 'model_type' key (e.g. 'gpt2', 'llama', 'biogpt')")
        _check(not (self.model_config is not None and self.quantization),
               "decoder.quantization needs pretrained weights; it cannot be combined with decoder.model_config")


@dataclass
class TuningConfig:
    """What trains in the decoder: `mode` names a registered `tuning.TuningMode` (frozen, lora, dora, full,
    prompt_tuning, prefix_tuning; see prefixvqa/tuning.py); the other fields are its settings. Code asks `method`.
    """

    mode: str = "lora"
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None -> DEFAULT_LORA_TARGETS[model_type]
    bias: TuningBias = "none"
    num_virtual_tokens: int = 10  # prompt/prefix tuning

    def __post_init__(self) -> None:
        check_types(self, "tuning")
        _choice("tuning", "mode", self.mode, tuple(TUNING_MODES))
        _check(self.r >= 1 and self.alpha > 0,
               f"tuning.r and tuning.alpha must be positive, got {self.r}, {self.alpha}")
        _check(self.num_virtual_tokens >= 1, "tuning.num_virtual_tokens must be >= 1")

    @property
    def method(self) -> TuningMode:
        """The registered mode object: its capabilities and behaviour (never compare `mode` strings)."""
        return get_tuning_mode(self.mode)


@dataclass
class TemplateConfig:
    """Prompt layout: a named template from `prompts.TEMPLATES` (including "chat", the tokenizer's own template)."""

    name: str = "plain"
    image_position: ImagePosition | None = None  # None -> the template's default
    system: str | None = None  # overrides the template's system text
    max_length: int = 512  # prompt + answer tokens, excluding the visual prefix
    # what opens a sequence: "tokenizer" = the tokens the tokenizer itself adds (Llama <s>, BioGPT </s>, GPT-2
    # nothing, as the published code tokenised), "bos" = always the BOS token, "none" = nothing
    start: TemplateStart = "tokenizer"
    # LLaVA's mm_use_im_start_end: a learned start and end vector around every image's prefix (trained with the mapper)
    image_start_end: bool = False

    def __post_init__(self) -> None:
        check_types(self, "template")
        _check(self.max_length >= 8, "template.max_length must be >= 8")


@dataclass
class GenerationConfig:
    """How the adapter answers by default (`answer`, `eval`, the CLI): the source paper's decoding, overridable."""

    num_beams: int = 1
    max_new_tokens: int = 32
    length_penalty: float = 1.0  # beam search only

    def __post_init__(self) -> None:
        check_types(self, "generation")
        _check(self.num_beams >= 1, f"generation.num_beams must be >= 1, got {self.num_beams}")
        _check(self.max_new_tokens >= 1, f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter: the parts' settings plus the base-model fingerprints written at save.

    `prefixvqa_config.json` is this object's JSON; presets, recipes and `from_pretrained` overrides all end here, so
    cross-section rules (a quantised base needs a quantisable tuning mode, a pooled-only mapper needs pooled
    features) are checked once, at construction."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: str | None = None
    description: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)  # filled at save time: encoder, decoder
    version: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = _SECTIONS.get(f.name)
            value = getattr(self, f.name)
            if kind is not None and isinstance(value, dict):
                setattr(self, f.name, _build(kind, value, f.name))
        from . import prompts  # local: prompts imports nothing heavy, but config must stay import-light

        _check(self.template.name in prompts.TEMPLATES,
               f"template.name={self.template.name!r} is not one of {sorted(prompts.TEMPLATES)}")
        quantisable = [name for name, m in TUNING_MODES.items() if m.quantisable]
        _check(self.tuning.method.quantisable or not self.decoder.quantization,
               f"tuning.mode={self.tuning.mode!r} cannot run on a quantized decoder (decoder.quantization="
               f"{self.decoder.quantization!r}); use one of {quantisable} or drop decoder.quantization")
        _check(not (self.mapper.input_tokens and self.encoder.features != "pooled"),
               "mapper.input_tokens expands one pooled vector (ClipCap): set encoder.features='pooled'")
        self._check_mapper_input()

    def _check_mapper_input(self) -> None:
        """A mapper that maps one pooled vector cannot read patch tokens (its capabilities: `mappers.Mapper`)."""
        if self.encoder.features == "pooled":
            return
        from .mappers import MAPPERS  # local: the mapper classes need torch; config stays import-light

        if MAPPERS[self.mapper.kind].pooled_only:
            readers = [kind for kind, cls in MAPPERS.items() if not cls.pooled_only]
            raise ConfigError(f"mapper.kind={self.mapper.kind!r} maps one pooled vector to L prefix vectors: set "
                              f"encoder.features='pooled' (use one of {readers} for patch tokens)")

    # --- JSON round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (JSON data only): what `prefixvqa_config.json` holds and `from_dict` reads back."""
        return asdict(self)

    def to_json(self) -> str:
        """The canonical JSON text (sorted keys), so equal configs write byte-equal files."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build and validate from nested dicts; unknown fields are errors naming the section (no silent typos)."""
        return _build(cls, data, "config")

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        """`from_dict` of a JSON text (an adapter folder's `prefixvqa_config.json`)."""
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides: Any) -> "AdapterConfig":
        """Return a copy with dotted overrides applied, e.g. `replace(**{"mapper.prefix_length": 4})`.

        A section name may also take a dict that is merged into it: `replace(decoder={"name": "gpt2"})`.
        """
        data = self.to_dict()
        for key, value in overrides.items():
            apply_override(data, key, value)
        return AdapterConfig.from_dict(data)


_SECTIONS: dict[str, type] = {"encoder": EncoderConfig, "mapper": MapperConfig, "decoder": DecoderConfig,
                              "tuning": TuningConfig, "template": TemplateConfig, "generation": GenerationConfig}


def _build(kind: type, data: dict[str, Any], where: str):
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    try:
        return kind(**data)
    except TypeError as exc:  # wrong types that dataclass construction itself rejects
        raise ConfigError(f"{where}: {exc}") from None


def apply_override(data: dict[str, Any], key: str, value: Any, *, strict: bool = True) -> None:
    """Set the value at a dotted path, in place: `data[a][b] = value` for "a.b", a list item by index
    ("stages.0.epochs"); "a__b" spells "a.b" where a keyword argument needs it (`replace(mapper__prefix_length=4)`).
    The one override engine: `AdapterConfig.replace`, presets, `from_pretrained(**overrides)` and recipe `--set`.

    strict (an AdapterConfig's dict, where every field exists): an unknown path is an error naming the known fields,
    and a dict given for a whole config section is merged into it (`replace(decoder={"name": ...})`). Not strict (a
    recipe, validated as a whole once every override is in): missing sections are created and the value replaces
    what was there; only a path through a non-section or a list index out of range is refused here.
    """
    parts = key.replace("__", ".").split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
        elif strict:
            _check(isinstance(node.get(part), dict), f"override {key!r}: no section {'.'.join(parts[: i + 1])!r}")
            node = node[part]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        _check(isinstance(node, (dict, list)), f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
        return
    if strict:
        _check(last in node, f"override {key!r}: unknown field {last!r}; expected one of {sorted(node)}")
        if isinstance(node[last], dict) and isinstance(value, dict) and last in _SECTIONS:
            value = {**node[last], **value}
    node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    try:
        index = int(part)
        node[index]
    except (ValueError, IndexError):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}") from None
    return index
