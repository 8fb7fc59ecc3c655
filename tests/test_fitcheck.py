"""fit-check: each part of the prediction against the exact bytes of real tensors of tiny models (loaded, trained
one step, traced with autograd's saved-tensor hooks), the verdict and largest batch, and the 2080 Ti recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefixvqa.config import AdapterConfig, ConfigError  # noqa: E402
from prefixvqa.fitcheck import (GIB, Architecture, StepPlan, decoder_architecture, encoder_architecture,  # noqa: E402
                                measured_weight_bytes, parse_size, predict, quantized_linear_bytes)
from prefixvqa.testing import QUANT_SIZES, build_decoder, tiny_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = [("llama", "4bit"), ("gpt2", "8bit"), ("llama", None), ("gpt2", None)]  # (family, quantization)
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    return {fam: build_decoder(root / fam, fam, sizes=QUANT_SIZES[fam]) for fam in ("llama", "gpt2")}


def tiny_config(folder: Path, quant: str | None, **decoder) -> AdapterConfig:
    over = tiny_overrides(folder)
    over["mapper"]["prefix_length"] = 2
    over["decoder"].update(quantization=quant, **decoder)
    return AdapterConfig().replace(**over, tuning={"dropout": 0.0})


def architecture(cfg: AdapterConfig) -> Architecture:
    return Architecture(decoder_architecture(cfg)[0], encoder_architecture(cfg)[0])


def build(cfg: AdapterConfig):
    from prefixvqa.model import MedVQAAdapter

    torch.manual_seed(0)
    return MedVQAAdapter(cfg)


@pytest.mark.parametrize("text, value", [("11GB", 11 * GIB), ("10.5GiB", int(10.5 * GIB)), ("800MB", 800 * 2 ** 20),
                                         ("1024", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value
    with pytest.raises(ConfigError, match="--gpu-mem"):
        parse_size("eleven gigs")


def test_quantized_linear_bytes_match_bitsandbytes_layers(folders):
    """Every bitsandbytes layer of loaded tiny models, 4-bit NF4 with double quantisation and 8-bit."""
    from prefixvqa.decoder import load_decoder

    for fam, quant in (("llama", "4bit"), ("gpt2", "8bit")):
        model, _ = load_decoder(tiny_config(folders[fam], quant).decoder)
        layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        assert layers
        for layer in layers:
            expected = quantized_linear_bytes(layer.out_features, layer.in_features, quant)
            bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
            assert measured_weight_bytes(layer) == expected + bias, (fam, layer)


@pytest.mark.parametrize("family, quant", CASES)
def test_weights_gradients_and_optimizer_states_are_exact(folders, family, quant):
    cfg = tiny_config(folders[family], quant)
    model = build(cfg)
    report = predict(StepPlan(model.config, ["mapper", "lora"], 2, 16), architecture(cfg))
    w = report.weights
    assert w["encoder"] == measured_weight_bytes(model.encoder.visual)
    assert w["mapper"] == measured_weight_bytes(model.mapper)
    decoder_parts = sum(v for k, v in w.items() if k not in ("encoder", "mapper"))
    assert decoder_parts == measured_weight_bytes(model.decoder)
    lora = sum(p.numel() * p.element_size() for n, p in model.decoder.named_parameters() if "lora_" in n)
    assert w["peft (LoRA / soft prompts)"] == lora
    # one real AdamW step on the trained groups: gradient and state bytes
    from prefixvqa.data.synthetic import colour_records

    model.set_trainable("mapper", "lora")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    recs = colour_records(2)
    model(**model.processor([r.image for r in recs], [r.question for r in recs], [r.answer for r in recs])
          ).loss.backward()
    opt.step()
    assert report.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert report.optimizer == sum(t.numel() * t.element_size() for t in states)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_magnitudes_count_as_trained_parameters(folders, family):
    """DoRA trains LoRA's factors plus one magnitude per output row of every target: fit-check's default groups and
    byte counts come from the same build, so the magnitudes are in the gradients and optimizer states."""
    from prefixvqa.tuning import default_groups

    cfg = tiny_config(folders[family], None).replace(tuning={"mode": "dora"})
    model = build(cfg)
    groups = default_groups(cfg)
    assert groups == ["mapper", "lora"]
    report = predict(StepPlan(model.config, groups, 2, 16), architecture(cfg))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    magnitudes = sum(p.numel() * p.element_size() for n, p in trained if "lora_magnitude_vector" in n)
    assert magnitudes > 0
    assert report.gradients == sum(p.numel() * p.element_size() for _, p in trained)
    assert report.optimizer == 2 * report.gradients
    lora = predict(StepPlan(cfg.replace(tuning={"mode": "lora"}), groups, 2, 16), architecture(cfg))
    assert report.gradients - lora.gradients == magnitudes
    assert report.weights["peft (LoRA / soft prompts)"] - lora.weights["peft (LoRA / soft prompts)"] == magnitudes


def saved_bytes(model, batch, checkpointing: bool) -> int:
    """Exact bytes a real step keeps for backward: unique storages saved by autograd, plus the tensors kept outside
    it (bitsandbytes 8-bit layers' inputs; the input of each checkpointed layer)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    def keep(t) -> None:  # a forward pre-hook must return None to leave the inputs alone
        add(t)

    hooks = [m.register_forward_pre_hook(lambda m, a: keep(a[0])) for m in model.modules()
             if isinstance(m, bnb.nn.Linear8bitLt)]
    if checkpointing:
        units = set(model.decoder.get_base_model()._no_split_modules)
        hooks += [m.register_forward_pre_hook(lambda m, a, k: keep(a[0] if a else k["hidden_states"]),
                                              with_kwargs=True)
                  for m in model.decoder.modules() if type(m).__name__ in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


@pytest.mark.parametrize("family, quant, checkpointing", [(f, q, False) for f, q in CASES] +
                         [("llama", "4bit", True), ("gpt2", None, True)])
def test_activations_match_saved_tensors_of_a_real_step(folders, family, quant, checkpointing):
    """The fake trace (no storage, any size) against a real tiny step's saved tensors at the same batch and length.
    Within 5%: the real step picks its supervised positions with a boolean mask, the trace keeps the last ones."""
    from prefixvqa.data.synthetic import colour_records

    cfg = tiny_config(folders[family], quant, gradient_checkpointing=checkpointing)
    model = build(cfg)
    model.set_trainable("mapper", "lora")
    model.train()
    recs = [r for r in colour_records(12) if r.answer == colour_records(12)[0].answer][:3]  # same answer length
    batch = model.processor([r.image for r in recs], [r.question for r in recs], [r.answer for r in recs])
    answer = int((batch["labels"][0, 1:] != -100).sum())
    real = saved_bytes(model, batch, checkpointing)
    plan = StepPlan(model.config, ["mapper", "lora"], len(recs), batch["input_ids"].shape[1], answer,
                    checkpointing=checkpointing)
    predicted = predict(plan, architecture(cfg)).activations
    fake = sum(v for k, v in predicted.items() if k != "encoder")  # the frozen tower keeps nothing
    assert abs(fake - real) <= 0.05 * real, (predicted, real)


def test_verdict_largest_batch_and_sharding(folders):
    cfg = tiny_config(folders["llama"], "4bit")
    arch = architecture(cfg)
    plan = StepPlan(cfg, ["mapper", "lora"], 2, 64)
    base = predict(plan, arch, budget=None, reserve=0)
    assert base.fits is None and base.largest_batch is None
    assert base.peak == sum(base.weights.values()) + base.optimizer + max(
        sum(base.activations.values()) + base.transient + base.gradients, 2 * base.gradients)
    tight = predict(plan, arch, budget=base.peak - 1, reserve=0)
    assert tight.fits is False and tight.largest_batch == 1 and "DOES NOT FIT" in tight.format()
    roomy = predict(plan, arch, budget=base.peak * 4, reserve=0)
    assert roomy.fits and roomy.largest_batch > 2 and "FITS" in roomy.format()
    bigger = predict(StepPlan(cfg, ["mapper", "lora"], roomy.largest_batch + 1, 64), arch)
    assert bigger.peak > base.peak * 4  # the next batch up no longer fits
    full = StepPlan(tiny_config(folders["llama"], None), ["mapper", "decoder"], 2, 64, strategy="fsdp",
                    num_processes=4)
    one = predict(StepPlan(full.config, ["mapper", "decoder"], 2, 64), arch)
    four = predict(full, arch)
    assert four.optimizer * 4 == pytest.approx(one.optimizer, rel=1e-6)
    assert sum(four.weights.values()) < sum(one.weights.values()) / 3


def test_cli_on_a_recipe_with_a_tiny_decoder(tmp_path, capsys):
    import yaml

    from prefixvqa.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"tiny": "llama"},
                                      "train": {"batch_size": 2, "output_dir": str(tmp_path)},
                                      "stages": [{"name": "align", "trainable": ["mapper"]},
                                                 {"name": "tune", "trainable": ["mapper", "lora"]}]}))
    assert main(["fit-check", str(recipe), "--gpu-mem", "11GB", "--text-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "fit-check [align]" in out and "fit-check [tune]" in out and out.count("FITS in 11.00 GiB") == 2
    assert main(["fit-check", str(recipe), "--gpu-mem", "1MB", "--stage", "tune"]) == 1  # does not fit: exit 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["fit-check", str(recipe), "--stage", "nope"]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["van_sonsbeek_slake_gpt2xl_2080ti", "mistral_7b_qlora_2080ti"])
def test_2080ti_recipes_state_their_fit_check_result(name):
    """Each 2080 Ti recipe's header states `fit-check (--gpu-mem 11GB): X GiB peak at batch B, fits, largest batch N`;
    the prediction (architectures recorded in the preset, nothing downloaded) must still say so."""
    from prefixvqa.fitcheck import fit_check
    from prefixvqa.train.recipe import load_recipe

    path = ROOT / "recipes" / f"{name}.yaml"
    stated = re.search(r"fit-check \(--gpu-mem 11GB\): ([0-9.]+) GiB peak at batch (\d+), fits, largest batch (\d+)",
                       path.read_text())
    assert stated, f"{path.name} does not state its fit-check result"
    (report,) = fit_check(load_recipe(path), "11GB")
    assert report.fits and report.plan.batch_size == int(stated.group(2))
    assert f"{report.peak / GIB:.2f}" == stated.group(1) and report.largest_batch == int(stated.group(3))
