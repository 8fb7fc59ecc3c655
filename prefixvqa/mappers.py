"""Mappers: image features (B, N, D_v) -> visual prefix (B, L, E) in the decoder's embedding space.

One registry, one constructor per published shape: per-token linear/MLP projections (LLaVA-Med, LLaVA-Rad), the
pooled MLP of van Sonsbeek et al., ClipCap's transformer mapper and a perceiver-style resampler (MedVInT-TD, Flamingo).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import ConfigError, MapperConfig

_ACT: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _mlp(sizes: list[int], activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [_ACT[activation](), nn.Dropout(dropout)] if dropout else [_ACT[activation]()]
    return nn.Sequential(*layers)


class TokenMLP(nn.Module):
    """Per-token projection, one prefix vector per feature token: `linear` (depth 1) and `mlp2x_gelu` (depth 2)."""

    def __init__(self, cfg: MapperConfig, depth: int, activation: str):
        super().__init__()
        hidden = cfg.hidden_dim or cfg.out_dim
        self.net = _mlp([cfg.in_dim] + [hidden] * (depth - 1) + [cfg.out_dim], activation, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, E)
        return self.net(x)


class PooledMLP(nn.Module):
    """van Sonsbeek et al.: pooled D -> L*E/2 -> L*E, reshaped to L prefix vectors (depth = number of layers)."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.length, self.dim = cfg.prefix_length, cfg.out_dim
        hidden = cfg.hidden_dim or (cfg.prefix_length * cfg.out_dim) // 2
        sizes = [cfg.in_dim] + [hidden] * (cfg.depth - 1) + [cfg.prefix_length * cfg.out_dim]
        self.net = _mlp(sizes, cfg.activation, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        return self.net(x.mean(dim=1)).view(x.shape[0], self.length, self.dim)


class TransformerMapper(nn.Module):
    """ClipCap: features projected into L tokens and joined by L learned constants, whose outputs are the prefix."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        self.length, width = cfg.prefix_length, cfg.hidden_dim or cfg.out_dim
        self.expand = nn.Linear(cfg.in_dim, cfg.prefix_length * width)  # pooled input -> L tokens
        self.project = nn.Linear(cfg.in_dim, width)  # patch input -> one token each
        self.const = nn.Parameter(torch.randn(cfg.prefix_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, cfg.dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, cfg.out_dim) if width != cfg.out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        B, N, _ = x.shape
        tokens = self.expand(x[:, 0]).view(B, self.length, -1) if N == 1 else self.project(x)  # (B, L|N, W)
        h = self.blocks(torch.cat([tokens, self.const.expand(B, -1, -1)], dim=1))  # (B, L|N + L, W)
        return self.out(h[:, -self.length:])


class ResamplerLayer(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(torch.cat([x, q], dim=1))  # Flamingo: queries attend to features and to themselves
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class Resampler(nn.Module):
    """Perceiver resampler: L learned queries cross-attend to the patch tokens (MedVInT-TD, Flamingo)."""

    def __init__(self, cfg: MapperConfig):
        super().__init__()
        width = cfg.hidden_dim or cfg.out_dim
        self.project = nn.Linear(cfg.in_dim, width)
        self.queries = nn.Parameter(torch.randn(cfg.prefix_length, width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, L, E)
        x = self.project(x)  # (B, N, W)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, L, W)
        for layer in self.layers:
            q = layer(q, x)
        return self.out(self.norm(q))


MAPPERS: dict[str, Callable[[MapperConfig], nn.Module]] = {
    "linear": lambda c: TokenMLP(c, depth=1, activation=c.activation),
    "mlp2x_gelu": lambda c: TokenMLP(c, depth=2, activation="gelu"),
    "mlp": PooledMLP,
    "transformer": TransformerMapper,
    "resampler": Resampler,
}


def build_mapper(cfg: MapperConfig) -> nn.Module:
    """Build from a config whose `in_dim`/`out_dim` are set (the adapter fills them from encoder and decoder)."""
    if not cfg.in_dim or not cfg.out_dim:
        raise ConfigError("mapper.in_dim and mapper.out_dim must be set before building (taken from the models)")
    width = cfg.hidden_dim or cfg.out_dim
    if cfg.kind in ("transformer", "resampler") and width % cfg.heads:
        raise ConfigError(f"mapper.heads={cfg.heads} must divide the mapper width {width} (hidden_dim or decoder dim)")
    return MAPPERS[cfg.kind](cfg)


def prefix_length(cfg: MapperConfig, num_tokens: int) -> int:
    """Prefix vectors produced for `num_tokens` input feature tokens."""
    return num_tokens if cfg.kind in ("linear", "mlp2x_gelu") else cfg.prefix_length
