"""Mappers: image features (B, N, D_v) -> visual prefix (B, L, E) in the decoder's embedding space.

One registry, one constructor per published shape: per-token linear/MLP projections (LLaVA-Med, LLaVA-Rad), the
pooled MLP (ClipCap's, van Sonsbeek et al.'s), ClipCap's transformer mapper, Flamingo's perceiver resampler,
MedVInT-TD's query decoder and Gemma 3's pooling projector (MedGemma). Each preset's parameter count is tested against
its source's.

What a kind accepts and produces is a class attribute of its class (`Mapper`): config validation, the processor's
prefix length and `build_mapper` ask the class instead of comparing kind names. The registry's names equal
`config.MAPPER_KINDS` (the `Literal` the CLI and docs read); a test keeps the two equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import MapperConfig

_ACT: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _mlp(sizes: list[int], activation: str, dropout: float) -> nn.Sequential:
    """Linear layers with [Dropout,] activation between them (dropout before the activation, as van Sonsbeek's)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += ([nn.Dropout(dropout)] if dropout else []) + [_ACT[activation]()]
    return nn.Sequential(*layers)


class Mapper(nn.Module):
    """Base of the registered mappers: (B, N, D_v) features -> (B, L, E) prefix, plus the capabilities that config
    validation and the processor read without building one."""

    kind: ClassVar[str]  # the `mapper.kind` name it is registered under
    pooled_only: ClassVar[bool] = False  # maps one pooled vector: needs encoder.features='pooled'
    per_token: ClassVar[bool] = False  # one prefix vector per input feature token (mapper.prefix_length unused)
    expands_pooled: ClassVar[bool] = False  # reads mapper.input_tokens: one pooled vector expanded to that many tokens
    attention: ClassVar[bool] = False  # attention layers: mapper.heads must divide the width unless head_dim is set
    pools_grid: ClassVar[bool] = False  # pools the square patch grid: prefix_length must be a square dividing it

    @classmethod
    def width(cls, cfg: MapperConfig) -> int:
        """The width its attention layers run at (hidden_dim, else the feature width)."""
        return cfg.hidden_dim or cfg.in_dim

    @classmethod
    def num_prefix(cls, cfg: MapperConfig, num_tokens: int) -> int:
        """Prefix vectors it produces for `num_tokens` input feature tokens."""
        return num_tokens if cls.per_token else cfg.prefix_length


MAPPERS: dict[str, type[Mapper]] = {}


def register_mapper(cls: type[Mapper]) -> type[Mapper]:
    """Class decorator: make a mapper available as `mapper.kind` (its name must be in `config.MAPPER_KINDS`)."""
    MAPPERS[cls.kind] = cls
    return cls


class TokenMLP(Mapper):
    """Per-token projection, one prefix vector per feature token: `linear` (depth 1) and `mlp2x_gelu` (depth 2)."""

    per_token = True

    def __init__(self, cfg: MapperConfig, depth: int, activation: str):
        super().__init__()
        hidden = cfg.hidden_dim or cfg.out_dim
        self.net = _mlp([cfg.in_dim] + [hidden] * (depth - 1) + [cfg.out_dim], activation, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, E)
        return self.net(x)


@register_mapper
class Linear(TokenMLP):
    """LLaVA's `linear` projector: one Linear per token (`mapper.activation` unused at depth 1)."""

    kind = "linear"

    def __init__(self, cfg: MapperConfig):
        super().__init__(cfg, depth=1, activation=cfg.activation)


@register_mapper
class MLP2xGELU(TokenMLP):
    """LLaVA-1.5 / LLaVA-Med's `mlp2x_gelu` projector: Linear-GELU-Linear per token."""

    kind = "mlp2x_gelu"

    def __init__(self, cfg: MapperConfig):
        super().__init__(cfg, depth=2, activation="gelu")


@register_mapper
class PooledMLP(Mapper):
    """One pooled vector -> L prefix vectors: D -> L*E/2 -> L*E [-> L*E ...] (ClipCap's MLP at depth 2, van Sonsbeek
    et al.'s at depth 3 with Dropout(0.5) before each Tanh), reshaped to (L, E)."""

    kind = "mlp"
    pooled_only = True

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.length, self.dim = cfg.prefix_length, cfg.out_dim
        full = cfg.prefix_length * cfg.out_dim
        sizes = [cfg.in_dim, cfg.hidden_dim or full // 2] + [full] * (cfg.depth - 1)
        self.net = _mlp(sizes if cfg.depth > 1 else [cfg.in_dim, full], cfg.activation, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        return self.net(x.mean(dim=1)).view(x.shape[0], self.length, self.dim)


class Attention(nn.Module):
    """Multi-head attention with explicit biases: ClipCap (no q/kv bias, output bias), Flamingo (no biases at all)."""

    def __init__(self, width: int, heads: int, head_dim: int, qkv_bias: bool, out_bias: bool, kv_width: int = 0):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.q = nn.Linear(width, inner, bias=qkv_bias)
        self.kv = nn.Linear(kv_width or width, 2 * inner, bias=qkv_bias)
        self.out = nn.Linear(inner, width, bias=out_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # (B, T, W), (B, S, W) -> (B, T, W)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, d)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, S, d)
        y = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def _feed_forward(width: int, cfg: MapperConfig, activation: str, bias: bool) -> nn.Sequential:
    hidden = int(width * cfg.mlp_ratio)
    return nn.Sequential(nn.Linear(width, hidden, bias=bias), _ACT[activation](), nn.Dropout(cfg.dropout),
                         nn.Linear(hidden, width, bias=bias))


@register_mapper
class TransformerMapper(Mapper):
    """ClipCap: a pooled vector expanded to `input_tokens` tokens (without `input_tokens`: patch features, one token
    each), joined by L learned constants; pre-norm self-attention blocks (no q/kv bias, feed-forward `mlp_ratio`x with
    `activation`); the constants' outputs are the prefix."""

    kind = "transformer"
    expands_pooled = True
    attention = True

    @classmethod
    def width(cls, cfg: MapperConfig) -> int:
        """ClipCap runs at the decoder's width (hidden_dim, else the prefix width)."""
        return cfg.hidden_dim or cfg.out_dim

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.length, self.tokens, width = cfg.prefix_length, cfg.input_tokens, self.width(cfg)
        if self.tokens:  # pooled input -> input_tokens tokens
            self.expand = nn.Linear(cfg.in_dim, self.tokens * width)
        else:  # patch input -> one token each
            self.project = nn.Linear(cfg.in_dim, width) if cfg.in_dim != width else nn.Identity()
        self.const = nn.Parameter(torch.randn(cfg.prefix_length, width))
        head_dim = cfg.head_dim or width // cfg.heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(width), "attn": Attention(width, cfg.heads, head_dim, qkv_bias=False, out_bias=True),
            "norm2": nn.LayerNorm(width), "ff": _feed_forward(width, cfg, cfg.activation, bias=True),
        }) for _ in range(cfg.depth))
        self.out = nn.Linear(width, cfg.out_dim) if width != cfg.out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        B = x.shape[0]
        tokens = self.expand(x.mean(1)).view(B, self.tokens, -1) if self.tokens else self.project(x)  # (B, S, W)
        h = torch.cat([tokens, self.const.expand(B, -1, -1)], dim=1)  # (B, S + L, W)
        for block in self.blocks:
            n = block["norm1"](h)
            h = h + block["attn"](n, n)
            h = h + block["ff"](block["norm2"](h))
        return self.out(h[:, -self.length:])


@register_mapper
class Resampler(Mapper):
    """Flamingo's perceiver resampler: L latents attend to [features; latents] (no biases, `head_dim` per head,
    GELU feed-forward), a final LayerNorm, then a projection to the decoder width (Flamingo instead cross-attends)."""

    kind = "resampler"
    attention = True

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        width = self.width(cfg)
        head_dim = cfg.head_dim or width // cfg.heads
        self.project = nn.Linear(cfg.in_dim, width) if cfg.in_dim != width else nn.Identity()
        self.latents = nn.Parameter(torch.randn(cfg.prefix_length, width))
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm_x": nn.LayerNorm(width), "norm_q": nn.LayerNorm(width),
            "attn": Attention(width, cfg.heads, head_dim, qkv_bias=False, out_bias=False),
            "ff": nn.Sequential(nn.LayerNorm(width), *_feed_forward(width, cfg, "gelu", bias=False)),
        }) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, cfg.out_dim) if width != cfg.out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        x = self.project(x)  # (B, N, W)
        q = self.latents.expand(x.shape[0], -1, -1)  # (B, L, W)
        for layer in self.layers:
            latents = layer["norm_q"](q)
            q = q + layer["attn"](latents, torch.cat([layer["norm_x"](x), latents], dim=1))
            q = q + layer["ff"](q)
        return self.out(self.norm(q))


@register_mapper
class QueryDecoder(Mapper):
    """MedVInT-TD: L learned queries through a pre-norm transformer decoder (self-attention, cross-attention to the
    features, ReLU feed-forward, dropout), a final LayerNorm, then Linear-ReLU-Linear to the decoder width."""

    kind = "query_decoder"
    attention = True

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        width = self.width(cfg)
        self.project = nn.Linear(cfg.in_dim, width) if cfg.in_dim != width else nn.Identity()
        self.queries = nn.Parameter(torch.randn(cfg.prefix_length, width))
        layer = nn.TransformerDecoderLayer(width, cfg.heads, int(width * cfg.mlp_ratio), cfg.dropout,
                                           activation=_ACT[cfg.activation](), batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.depth, norm=nn.LayerNorm(width))
        self.out = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, cfg.out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        memory = self.project(x)  # (B, N, W)
        return self.out(self.decoder(self.queries.expand(x.shape[0], -1, -1), memory))  # (B, L, E)


@register_mapper
class Gemma3Projector(Mapper):
    """Gemma 3's multimodal projector (transformers' Gemma3MultiModalProjector): the square patch grid average-pooled
    to `mapper.prefix_length` tokens (MedGemma: 4096 patches -> 256), Gemma's RMSNorm (scale 1 + weight, computed in
    float32; eps 1e-6, SigLIP's layer_norm_eps) and one projection matrix without bias (`mm_input_projection_weight`,
    D_v x E). A fresh one starts with a unit norm and a random projection; `from_vlm` loads the checkpoint's."""

    kind = "gemma3"
    pools_grid = True
    eps: ClassVar[float] = 1e-6

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.side = int(round(cfg.prefix_length ** 0.5))
        if self.side * self.side != cfg.prefix_length:
            raise ConfigError(f"mapper.kind='gemma3' pools a square grid: prefix_length={cfg.prefix_length} is not "
                              "a square number")
        self.mm_soft_emb_norm = nn.Parameter(torch.zeros(cfg.in_dim))
        self.mm_input_projection_weight = nn.Parameter(torch.randn(cfg.in_dim, cfg.out_dim) * cfg.in_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        B, N, D = x.shape
        grid = int(round(N ** 0.5))
        if grid * grid != N or grid % self.side:
            raise ConfigError(f"mapper.kind='gemma3': {N} patch tokens are not a square grid that pools to "
                              f"{self.side}x{self.side}")
        k = grid // self.side
        pooled = nn.functional.avg_pool2d(x.transpose(1, 2).reshape(B, D, grid, grid).contiguous(), k, k)
        pooled = pooled.flatten(2).transpose(1, 2)  # (B, L, D)
        h = pooled.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
                  * (1.0 + self.mm_soft_emb_norm.float())).type_as(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(x)


class WithImageDelimiters(nn.Module):
    """LLaVA's `<im_start>` / `<im_end>`: two learned vectors around each prefix, (B, L, E) -> (B, L + 2, E). Upstream
    adds them as tokens initialised to the mean token embedding; here they live with the mapper and train with it."""

    def __init__(self, mapper: nn.Module, dim: int):
        super().__init__()
        self.mapper = mapper
        self.delimiters = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L + 2, E)
        prefix = self.mapper(x)
        ends = self.delimiters.to(prefix.dtype).expand(prefix.shape[0], -1, -1)
        return torch.cat([ends[:, :1], prefix, ends[:, 1:]], dim=1)


def build_mapper(cfg: MapperConfig, image_start_end: bool = False) -> nn.Module:
    """Build from a config whose `in_dim`/`out_dim` are set (the adapter fills them from encoder and decoder);
    `image_start_end` wraps it with learned start/end vectors (template.image_start_end)."""
    if not cfg.in_dim or not cfg.out_dim:
        raise ConfigError("mapper.in_dim and mapper.out_dim must be set before building (taken from the models)")
    cls = MAPPERS[cfg.kind]
    width = cls.width(cfg)
    if cls.attention and width % cfg.heads and not cfg.head_dim:
        raise ConfigError(f"mapper.heads={cfg.heads} must divide the mapper width {width} (hidden_dim or decoder dim)")
    mapper = cls(cfg)
    return WithImageDelimiters(mapper, cfg.out_dim) if image_start_end else mapper


def prefix_length(cfg: MapperConfig, num_tokens: int, image_start_end: bool = False) -> int:
    """Prefix vectors produced for `num_tokens` input feature tokens (+2 with learned image start/end vectors)."""
    return MAPPERS[cfg.kind].num_prefix(cfg, num_tokens) + 2 * image_start_end
