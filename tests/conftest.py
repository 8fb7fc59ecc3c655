"""Shared fixtures: tiny offline decoders of every family, built once per session from local configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory):
    """{family: folder} for gpt2, biogpt, llama (tiny random weights + a tiny BPE tokenizer)."""
    from prefixvqa.testing import build_decoder

    root = tmp_path_factory.mktemp("decoders")
    return {fam: build_decoder(root / fam, fam) for fam in ("gpt2", "biogpt", "llama", "mistral", "gemma3_text")}


@pytest.fixture(scope="session")
def other_gpt2(tmp_path_factory):
    """A second tiny GPT-2 with different weights: a different base model."""
    from prefixvqa.testing import build_decoder

    return build_decoder(tmp_path_factory.mktemp("other") / "gpt2", "gpt2", seed=1)
