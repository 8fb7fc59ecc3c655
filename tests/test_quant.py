"""Quantised decoders on CPU (bitsandbytes >= 0.45 runs there): QLoRA (4-bit NF4 + double quantisation, k-bit
preparation, gradient checkpointing) and 8-bit LoRA train, save, reload and answer the same; the merged export is a
plain transformers decoder + mapper + processor that loads without peft or bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from prefixvqa.config import AdapterConfig, ConfigError  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.testing import QUANT_SIZES, build_decoder, tiny_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (family, quantization, bitsandbytes layer type): Llama in 4-bit, GPT-2 (Conv1D weights) in 8-bit
CASES = [("llama", "4bit", "Linear4bit"), ("gpt2", "8bit", "Linear8bitLt")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {fam: build_decoder(root / fam, fam, sizes=QUANT_SIZES[fam]) for fam in ("llama", "gpt2")}


def config(folder: Path, quant: str | None) -> AdapterConfig:
    over = tiny_overrides(folder)
    over["mapper"]["prefix_length"] = 2
    over["decoder"].update(quantization=quant, gradient_checkpointing=quant is not None)
    return AdapterConfig().replace(**over, tuning={"dropout": 0.0})


def ask(model, records, **kw):
    return model.answer([r.image for r in records], [r.question for r in records], max_new_tokens=4, **kw)


def supervised_logits(model, records) -> torch.Tensor:
    """Logits at the answer positions in eval mode (no dropout) with gradients on: the path training takes, where
    bitsandbytes' CPU inference kernel (which repacks 4-bit weights with bf16 statistics) is not used."""
    batch = model.processor([r.image for r in records], [r.question for r in records], [r.answer for r in records])
    model.eval()
    with torch.enable_grad():
        return model(**batch).logits.detach()


@pytest.mark.parametrize("family, quant, layer", CASES)
def test_quantised_lora_trains_saves_reloads_and_merges(tmp_path, folders, family, quant, layer):
    from prefixvqa.export import export_merged
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.train import TrainConfig, train

    torch.manual_seed(0)
    model = MedVQAAdapter(config(folders[family], quant))
    base = model.decoder.get_base_model()
    quantised = [m for m in base.modules() if type(m).__name__ == layer]
    assert quantised and base.is_gradient_checkpointing
    if quant == "4bit":  # NF4 with double quantisation
        state = quantised[0].weight.quant_state
        assert state.quant_type == "nf4" and state.nested
    # k-bit preparation: everything but the quantised weights and the trained tensors is float32 and frozen
    assert all(p.dtype == torch.float32 for n, p in base.named_parameters() if p.dtype.is_floating_point)
    records = colour_records(8)
    result = train(model, records, None, TrainConfig(output_dir=str(tmp_path / "run"), epochs=3, batch_size=4,
                                                    lr={"mapper": 1e-2, "lora": 1e-2}, log_every=1, progress=False,
                                                    tensorboard=False, plot=False))
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert {p.name for p in result.last_dir.iterdir()} >= {"adapter_model.safetensors", "mapper.safetensors"}

    model.eval()
    before, probs = ask(model, records[:3]), model.score_choices([r.image for r in records[:3]],
                                                                 [r.question for r in records[:3]],
                                                                 [["red", "blue"]] * 3)
    reloaded = MedVQAAdapter.from_pretrained(result.last_dir).eval()
    assert any(type(m).__name__ == layer for m in reloaded.decoder.get_base_model().modules())
    after = ask(reloaded, records[:3])
    assert [a.text for a in after] == [a.text for a in before]
    assert [a.score for a in after] == pytest.approx([a.score for a in before], abs=1e-5)
    torch.testing.assert_close(torch.tensor(reloaded.score_choices([r.image for r in records[:3]],
                                                                   [r.question for r in records[:3]],
                                                                   [["red", "blue"]] * 3)), torch.tensor(probs))

    # merge: exported from a freshly loaded adapter (bitsandbytes' CPU inference repacks 4-bit weights, lossy)
    fresh = MedVQAAdapter.from_pretrained(result.last_dir)
    reference = supervised_logits(fresh, records[:3])
    packed = any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                 for m in reloaded.modules() if isinstance(m, bnb.nn.Linear4bit))
    if packed:  # CPUs with AVX512-BF16: answering repacked the 4-bit weights; exporting that copy is refused
        with pytest.raises(ConfigError, match="freshly loaded"):
            export_merged(reloaded, tmp_path / "not-this-one", "float32")
    folder, caveat = export_merged(fresh, tmp_path / "merged", "float32")
    assert "dequantis" in caveat and quant in caveat
    merged = MedVQAAdapter.from_pretrained(folder)
    assert merged.config.tuning.mode == "frozen" and merged.config.decoder.quantization is None
    assert not any(type(m).__module__.startswith(("bitsandbytes", "peft")) for m in merged.modules())
    merged_logits = supervised_logits(merged, records[:3])
    if quant == "4bit":  # 4-bit layers dequantise to compute: the merged decoder computes the same function
        torch.testing.assert_close(merged_logits, reference, rtol=1e-4, atol=1e-4)
    else:  # LLM.int8 also rounds activations to int8 at run time; the full-precision merge does not
        assert (merged_logits - reference).abs().mean() < 0.05 * reference.abs().mean()
        assert [a.text for a in ask(merged.eval(), records[:3])] == [a.text for a in before]
    without_peft(folder, records[:3], merged)


def without_peft(folder: Path, records, merged) -> None:
    """Load the export in a fresh interpreter where importing peft or bitsandbytes fails; same answers."""
    script = f"""
import json, sys
sys.modules["peft"] = None
sys.modules["bitsandbytes"] = None
from prefixvqa.model import MedVQAAdapter
from prefixvqa.data.synthetic import colour_records
model = MedVQAAdapter.from_pretrained({str(folder)!r}).eval()
recs = colour_records(8)[:3]
out = model.answer([r.image for r in recs], [r.question for r in recs], max_new_tokens=4)
print("ANSWERS", json.dumps([[a.text, a.score] for a in out]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("ANSWERS ", 1)[1])
    want = ask(merged.eval(), records)
    assert [g[0] for g in got] == [a.text for a in want]
    assert [g[1] for g in got] == pytest.approx([a.score for a in want], abs=1e-5)


def test_merge_of_a_full_precision_lora_is_exact_for_conv1d_and_linear(tmp_path, folders):
    """GPT-2 stores attention weights transposed (Conv1D); Llama uses nn.Linear: both merge to the same function."""
    from prefixvqa.export import export_merged
    from prefixvqa.model import MedVQAAdapter

    records = colour_records(3)
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = MedVQAAdapter(config(folders[family], None), seed=None)  # LoRA init from the stream seeded above
        with torch.no_grad():  # stand-in for training: non-zero LoRA updates
            for _, p in model.parameter_groups()["lora"]:
                p.add_(torch.randn_like(p) * 0.2)
        folder, caveat = export_merged(model, tmp_path / family)
        assert caveat is None
        merged = MedVQAAdapter.from_pretrained(folder)
        torch.testing.assert_close(supervised_logits(merged, records), supervised_logits(model, records),
                                   rtol=1e-4, atol=1e-4)
        assert (folder / "decoder" / "model.safetensors").is_file() and (folder / "decoder" / "config.json").is_file()
        assert export_merged(model, folder)[0] == folder  # an earlier export is replaced
    project = tmp_path / "project"
    (project / "notes.txt").parent.mkdir()
    (project / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier merged export"):
        export_merged(model, project)
    assert (project / "notes.txt").read_text() == "keep me"


def test_export_cli(tmp_path, folders, capsys):
    from prefixvqa.cli import main
    from prefixvqa.model import MedVQAAdapter

    torch.manual_seed(0)
    MedVQAAdapter(config(folders["llama"], "4bit")).save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")]) == 2
    assert "needs --merge" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), "--merge", "--out", str(tmp_path / "m"),
                 "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert "merged export" in captured.out and "precision" in captured.err and "dequantis" in captured.err
    cfg = json.loads((tmp_path / "m" / "prefixvqa_config.json").read_text())
    assert cfg["decoder"]["name"] == "adapter:decoder" and cfg["decoder"]["dtype"] == "bfloat16"
    assert "dequantis" in (tmp_path / "m" / "README.md").read_text()
    prompt = MedVQAAdapter(config(folders["llama"], None).replace(tuning={"mode": "prompt_tuning"}))
    prompt.save_pretrained(tmp_path / "prompt")
    assert main(["export", str(tmp_path / "prompt"), "--merge", "--out", str(tmp_path / "p")]) == 2
    assert "soft prompts" in capsys.readouterr().err
