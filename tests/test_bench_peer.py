"""The LLaVA peer benchmark measures the same computation on both sides: its equality checks pass on a tiny copy of
the architecture, and they fail when the two sides differ."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """A module from benchmarks/ (not a package; the script imports `peer` by this name too)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def pair_and_work(tmp_path_factory):
    peer = _load("peer")
    pair = peer.build_pair(peer.TINY_ARCH, tmp_path_factory.mktemp("peer"))
    return peer, pair, peer.make_workload(pair.tok, 8, peer.TINY_ARCH.image_size)


def test_same_loss_answers_and_scores(pair_and_work):
    peer, pair, work = pair_and_work
    report = peer.check_equal(pair, work)
    assert report["vision_hidden_states"] == peer.TINY_ARCH.v_layers + 1  # layer -2 is the last block but one
    assert report["answer_tokens"] > 10 and len(set(report["answers_peer"])) > 1
    assert abs(report["loss_prefixvqa"] - report["loss_peer"]) < 1e-4


@pytest.mark.parametrize("change", ["lora", "layer"])
def test_check_fails_when_the_peer_differs(pair_and_work, change):
    """A changed LoRA tensor, or LLaVA's features taken from the last layer instead of -2, must not pass."""
    peer, pair, work = pair_and_work
    config = pair.peer.base_model.model.config
    lora_b = next(p for n, p in pair.peer.named_parameters() if "lora_B" in n)
    saved = lora_b.detach().clone()
    with torch.no_grad():
        if change == "lora":
            lora_b.add_(0.05)
        else:
            config.vision_feature_layer = -1
    try:
        with pytest.raises(AssertionError, match="loss differs"):
            peer.check_equal(pair, work)
    finally:
        config.vision_feature_layer = -2
        with torch.no_grad():
            lora_b.copy_(saved)


def test_reduce_bpe_keeps_a_working_tokenizer():
    peer = _load("peer")
    data = {"added_tokens": [{"id": 0, "content": "<s>"}, {"id": 9, "content": "<x>"}],
            "model": {"vocab": {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6},
                      "merges": [["a", "b"], ["ab", "c"], ["b", "c"]]}}
    out = peer.reduce_bpe(data, 5)
    assert out["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4}
    assert out["model"]["merges"] == [["a", "b"]]
    assert [t["id"] for t in out["added_tokens"]] == [0]


def test_benchmark_script_runs(tmp_path):
    bench = _load("bench_llava_peer")
    out = bench.main(["--tiny", "--quick", "--repeats", "1", "--warmup", "0", "--only", "score", "--no-memory",
                      "--json", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file() and out["rows"][0]["ratio"] > 0
