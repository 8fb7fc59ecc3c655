"""fit-check answers for every preset offline (conftest sets HF_HUB_OFFLINE=1, nothing is downloaded): each preset
records its decoder's architecture (and a hub encoder's open_clip config) with the file it was read from, and the
decoder weight bytes fit-check predicts equal the parameter count of the model built on the meta device from that
record, which in turn equals the published parameter count where one is known."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from prefixvqa.fitcheck import fit_check, quantized_linear_bytes  # noqa: E402
from prefixvqa.fitcheck_build import RECORD_KEYS  # noqa: E402
from prefixvqa.presets import list_presets, preset_config, preset_info  # noqa: E402
from prefixvqa.train.recipe import Recipe  # noqa: E402

# parameters of the released checkpoints (model cards / safetensors metadata), tied embeddings counted once
PUBLISHED = {"openai-community/gpt2": 124_439_808, "openai-community/gpt2-xl": 1_557_611_200,
             "huggyllama/llama-7b": 6_738_415_616, "lmsys/vicuna-7b-v1.5": 6_738_415_616,
             "chaoyi-wu/PMC_LLAMA_7B": 6_738_415_616, "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
             "microsoft/biogpt": 346_763_264}


def meta_decoder(record: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The recorded architecture as a transformers model on the meta device (no storage), tied as loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**{k: v for k, v in record.items() if k not in RECORD_KEYS}), dtype=dtype)
    model.tie_weights()
    return model


def expected_decoder_bytes(model: torch.nn.Module, quantization: str | None) -> int:
    """Weights + buffers of the decoder as loaded for training. Quantised: every linear layer but the output head is
    bitsandbytes-packed, everything else is fp32 after peft's k-bit preparation."""
    from transformers.pytorch_utils import Conv1D

    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    params = list(model.parameters())  # unique: tied weights once
    if not quantization:
        return sum(p.numel() * p.element_size() for p in params) + buffers
    head = model.get_output_embeddings().weight
    packed, packed_ids = 0, set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not head:
            out_f, in_f = (module.weight.shape[1], module.weight.shape[0]) if isinstance(module, Conv1D) \
                else module.weight.shape
            packed += quantized_linear_bytes(out_f, in_f, quantization)
            packed_ids.add(id(module.weight))
    rest = sum(p.numel() for p in params if id(p) not in packed_ids)
    return packed + 4 * rest + buffers


def is_open_clip_builtin(name: str) -> bool:
    import open_clip

    return not name.startswith("hf-hub:") and bool(open_clip.get_model_config(name))


@pytest.mark.slow  # 11 fit-checks of full-size architectures: ~35 s on a quiet 2-core machine
@pytest.mark.parametrize("name", list_presets())
def test_fit_check_answers_offline_and_counts_the_recorded_architecture(name, tmp_path):
    cfg, arch = preset_config(name), preset_info(name).get("architecture") or {}
    record = arch.get("decoder")
    assert record and record["_name_or_path"] == cfg.decoder.name and record.get("_source"), \
        f"preset {name}: no architecture recorded for decoder {cfg.decoder.name!r}"
    if not is_open_clip_builtin(cfg.encoder.name):  # open_clip ships its own configs; hub encoders are recorded
        assert arch["encoder"]["name"] == cfg.encoder.name and arch["encoder"].get("source"), name
    (report,) = fit_check(Recipe(model={"preset": name}, train={"output_dir": str(tmp_path)}), "11GB")
    assert report.fits is not None and report.largest_batch is not None
    assert "decoder" in report.sources and "encoder" in report.sources
    model = meta_decoder(record, getattr(torch, cfg.decoder.dtype))
    predicted = report.weights.get("decoder", 0) + report.weights.get("decoder (quantised layers)", 0)
    assert predicted == expected_decoder_bytes(model, cfg.decoder.quantization), name
    if cfg.decoder.name in PUBLISHED:
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED[cfg.decoder.name]


def test_a_model_is_recorded_the_same_way_in_every_preset():
    """Presets sharing a base model (LLaMA-7B, BiomedCLIP, GPT-2) record the same facts: one truth per model."""
    seen: dict[str, tuple[str, dict]] = {}
    for name in list_presets():
        arch = preset_info(name).get("architecture") or {}
        for part, key in (("decoder", "_name_or_path"), ("encoder", "name")):
            if part in arch:
                record = arch[part]
                first = seen.setdefault(f"{part}:{record[key]}", (name, record))  # one checkpoint can hold both
                assert record == first[1], f"{name} and {first[0]} record {record[key]} differently"


def test_recipes_readme_states_the_2080ti_results_their_headers_state():
    """recipes/README.md repeats each 2080 Ti recipe's fit-check line (the headers are checked against a fresh
    prediction in test_fitcheck.py)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "recipes" / "README.md").read_text()
    recipes = sorted((root / "recipes").glob("*2080ti*.yaml"))
    assert recipes
    for path in recipes:
        stated = re.search(r"fit-check \(--gpu-mem 11GB\): (.+?)\n", path.read_text())
        assert stated, path.name
        assert f"| `{path.name}` | {stated.group(1).strip()} |" in readme, path.name
