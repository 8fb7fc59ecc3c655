"""Packed batches (`train.packing`): a packed batch computes what the padded one computes (summed token loss and
gradients, every packable decoder family, image prefixes at each record's place), a packed run trains like a padded
one and resumes exactly, and what cannot keep records apart (BLOOM's ALiBi, soft prompts, a too-short sliding
window) is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefixvqa import testing, tuning  # noqa: E402
from prefixvqa.config import ConfigError  # noqa: E402
from prefixvqa.data import packing  # noqa: E402
from prefixvqa.data.packing import PackingUnsupported, first_fit, pack_batch, segment_positions  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.train import TrainConfig, train  # noqa: E402
from prefixvqa.train.recipe import build_model  # noqa: E402
from helpers import adapter_tensors  # noqa: E402

FAST = {"progress": False, "tensorboard": False, "plot": False}
WORDS = "is there a lesion in the left lung how many nodules are seen on this chest film".split()

# tiny stand-ins for the packable families the shipped tiny builders do not cover (same sizes as theirs)
EXTRA_FAMILIES = {
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 512},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 512},
    "phi3": {"model_type": "phi3", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 512, "pad_token_id": 0},
    "gpt_neo": {"model_type": "gpt_neo", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 512, "window_size": 256},
    "bloom": {"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 2},
}
EXTRA_TARGETS = {"gpt_neo": ["q_proj", "v_proj"], "bloom": ["query_key_value"]}  # no project default for these


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packing")


def tiny_model(work: Path, family: str, monkeypatch: pytest.MonkeyPatch | None = None, **config):
    """A tiny adapter (3 prefix vectors, LoRA without dropout) on a random decoder of `family`."""
    if family in EXTRA_FAMILIES:
        monkeypatch.setitem(testing.TINY_DECODERS, family, {**EXTRA_FAMILIES[family], "initializer_range": 0.3})
        if family in EXTRA_TARGETS:
            monkeypatch.setitem(tuning.DEFAULT_LORA_TARGETS, family, EXTRA_TARGETS[family])
    torch.manual_seed(0)
    cfg = {"mapper": {"prefix_length": 3}, "tuning": {"dropout": 0.0}, **config}
    return build_model({"tiny": family, "config": cfg}, work, seed=0)


def varied_records(n: int = 7, seed: int = 0):
    """Colour records with questions and answers of different lengths (what makes padding expensive)."""
    records = colour_records(n, seed=seed)
    for i, r in enumerate(records):
        r.question = " ".join(WORDS[:2 + (3 * i) % 14]) + "?"
        r.answer = " ".join(WORDS[:1 + (5 * i) % 8])
    return records


def batches(model, capacity: int = 90):
    """(padded, packed) batches of the same records; records 1 and 3 share one image slot (image_index)."""
    proc = model.processor
    items = [proc.encode_record(r) for r in varied_records()]
    items[3]["image_key"] = items[1]["image_key"]
    padded = proc.collate(items)
    return padded, pack_batch(padded, capacity, proc.image_seq_length, proc.pad_id)


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """Summed token loss and the gradients of the mean loss w.r.t. every trainable tensor."""
    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    out.loss.backward()
    n = int((batch["labels"][:, 1:] != -100).sum())
    return float(out.loss.detach()) * n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_first_fit_and_row_spreading_are_deterministic_and_never_split():
    assert first_fit([5, 3, 8, 2, 12, 4], 10) == [[4], [2, 3], [0, 5], [1]]
    assert first_fit([5, 3, 8, 2, 12, 4], 10) == first_fit([5, 3, 8, 2, 12, 4], 10)
    assert first_fit([4, 4, 4], 4) == [[0], [1], [2]]
    # as many rows as first-fit needs, spread evenly: width 9 instead of 12 (27 cells, not 36)
    assert first_fit([4, 4, 4, 4, 4, 4, 1], 12) == [[0, 1, 2], [3, 4, 5], [6]]
    assert packing.pack_rows([4, 4, 4, 4, 4, 4, 1], 12) == [[0, 3, 6], [1, 4], [2, 5]]
    assert packing.pack_rows([5, 3, 8, 2, 12, 4], 10) == [[4], [2], [0, 3], [5, 1]]
    assert packing.pack_rows([20, 3, 3], 10) == [[0], [1, 2]]  # over-long record: first-fit's rows
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_pack_layout_keeps_records_labels_and_image_slots(work):
    model = tiny_model(work, "gpt2")
    padded, packed = batches(model)
    B, T = packed["input_ids"].shape
    assert B < padded["input_ids"].shape[0] and int(packed["segment_ids"].max()) >= 3  # really packed
    assert T <= 90 and int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())
    assert (packed["attention_mask"].bool() == (packed["segment_ids"] > 0)).all()
    starts = torch.ones_like(packed["segment_ids"], dtype=torch.bool)
    starts[:, 1:] = packed["segment_ids"][:, 1:] != packed["segment_ids"][:, :-1]
    assert (packed["labels"][starts] == -100).all()  # no target right after a record boundary
    assert sorted(packed["labels"][packed["labels"] != -100].tolist()) == \
        sorted(padded["labels"][padded["labels"] != -100].tolist())
    # each record's image slot follows it: the slot images in row order are the records' own, reordered
    assert sorted(packed["image_index"].tolist()) == sorted(padded["image_index"].tolist())
    assert not torch.equal(packed["image_index"], padded["image_index"])
    assert packed["ids"] == padded["ids"] and torch.equal(packed["pixel_values"], padded["pixel_values"])


@pytest.mark.parametrize("family", sorted(packing.PACKABLE_MODEL_TYPES))
def test_packed_loss_and_gradients_equal_the_padded_batch(work, family, monkeypatch):
    """Every registered family: same summed token loss (1e-6 relative) and same gradients of the trainable tensors
    (mapper + LoRA, 1e-5) with an image prefix per record; without the block mask the loss differs."""
    model = tiny_model(work, family, monkeypatch).eval()
    padded, packed = batches(model)
    loss_a, grads_a = loss_and_grads(model, padded)
    loss_b, grads_b = loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("mapper") for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-5, msg=k)
    leaky, _ = loss_and_grads(model, {k: v for k, v in packed.items() if k != "segment_ids"})
    assert abs(leaky - loss_a) > 1e-4 * abs(loss_a)  # records seeing each other: 100x the tolerance above


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eager_attention_takes_the_additive_mask(work, family):
    model = tiny_model(work, family).eval()
    model.decoder.config._attn_implementation = "eager"
    padded, packed = batches(model)
    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(model, padded), loss_and_grads(model, packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-5, msg=k)


def test_bloom_cannot_keep_records_apart_and_is_refused_in_one_line(work, monkeypatch, tmp_path):
    model = tiny_model(work, "bloom", monkeypatch)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4, packing=True, **FAST)
    with pytest.raises(PackingUnsupported) as err:
        train(model, varied_records(4), None, cfg)
    msg = str(err.value)
    assert "\n" not in msg and "'bloom'" in msg and "train.packing: false" in msg
    assert not (tmp_path / "run" / "last").exists()
    # why: BLOOM builds its ALiBi biases from a 2-D padding mask and takes no position ids
    monkeypatch.setattr(packing, "PACKABLE_MODEL_TYPES", packing.PACKABLE_MODEL_TYPES | {"bloom"})
    padded, packed = batches(model.eval())
    with pytest.raises(Exception):
        loss_a, loss_b = loss_and_grads(model, padded)[0], loss_and_grads(model, packed)[0]
        assert loss_b == pytest.approx(loss_a, rel=1e-6)


def test_soft_prompts_and_short_sliding_windows_are_refused(work, tmp_path):
    prompt = tiny_model(work, "gpt2", tuning={"mode": "prompt_tuning", "num_virtual_tokens": 2})
    with pytest.raises(PackingUnsupported, match="prompt_tuning.*each row, not of each packed record") as err:
        train(prompt, varied_records(4), None, TrainConfig(output_dir=str(tmp_path / "p"), packing=True, **FAST))
    assert "\n" not in str(err.value)
    mistral = tiny_model(work, "mistral").eval()
    _, packed = batches(mistral)
    mistral.decoder.config.sliding_window = 12  # shorter than some records: the block mask cannot apply it
    with pytest.raises(PackingUnsupported, match="sliding attention window \\(12\\)"):
        mistral(**{k: v for k, v in packed.items() if isinstance(v, torch.Tensor)})


def test_config_fields_are_validated():
    assert TrainConfig.from_dict(TrainConfig(packing=True, packing_length=64).to_dict()).packing_length == 64
    with pytest.raises(ConfigError, match="train.packing_length is set but packing is false"):
        TrainConfig(packing_length=64)
    with pytest.raises(ConfigError, match="train.packing_length must be >= 1"):
        TrainConfig(packing=True, packing_length=0)


def run(work: Path, out: Path, **extra):
    model = tiny_model(work, "gpt2")
    for module in model.modules():  # GPT-2's own dropout draws per position: the two layouts would draw differently
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=4, seed=3, lr={"mapper": 1e-2, "lora": 1e-2},
                      **FAST, **extra)
    return train(model, varied_records(10), varied_records(3, seed=1), cfg)


def test_a_packed_run_trains_like_the_padded_run(work):
    """Same records per step, same loss: without dropout, after 6 AdamW steps (and the packed eval loss) the
    adapters agree."""
    padded, packed = run(work, work / "padded"), run(work, work / "packed", packing=True, packing_length=64)
    a, b = adapter_tensors(work / "padded" / "last"), adapter_tensors(work / "packed" / "last")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    evals = [[r["value"] for r in res.history if r["kind"] == "eval"] for res in (padded, packed)]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)


@pytest.mark.slow
def test_kill_and_resume_with_packing_is_exact(work):
    """The trainer's kill-and-resume script with `train.packing` (dropout on, DataLoader without workers)."""
    from test_trainer import run_in_process, run_script

    full, cut = work / "packed-full", work / "packed-cut"
    killed = run_script(work, cut, kill_at=2, extra={"packing": True})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((cut / "last" / "trainer_state" / "state.json").read_text())["step"] == 2
    assert run_in_process(work, cut, {"resume": True, "packing": True}).stopped_reason == "completed"
    assert run_in_process(work, full, {"packing": True}).stopped_reason == "completed"
    a, b = adapter_tensors(full / "last"), adapter_tensors(cut / "last")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
