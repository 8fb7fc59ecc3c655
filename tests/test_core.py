"""Table-driven core tests: every mapper x decoder family x tuning mode on tiny random models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from prefixvqa import MedVQAAdapter
from prefixvqa.adapter_io import AdapterLoadError
from prefixvqa.config import TUNING_MODES, AdapterConfig, ConfigError
from prefixvqa.mappers import MAPPERS
from prefixvqa.prompts import TEMPLATES
from helpers import plain_transformers_batch
from prefixvqa.testing import TINY_ENCODER

FAMILIES = ("gpt2", "biogpt", "llama")
FEATURES = {"mlp": "pooled", "transformer": "pooled"}  # the others read patch tokens (transformer: ClipCap)
IMAGES = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("L", (40, 40), 90)]
QUESTIONS = ["is there a lesion?", "which side?"]
ANSWERS = ["yes", "left lung"]


def make_config(folder, mapper="mlp", mode="lora", **extra) -> AdapterConfig:
    cfg = {"encoder": {**TINY_ENCODER, "features": FEATURES.get(mapper, "patches"), "layer": -1},
           "mapper": {"kind": mapper, "prefix_length": 4 if MAPPERS[mapper].pools_grid else 3, "heads": 2,
                      "depth": 2},  # gemma3 pools the tiny tower's 4 x 4 patch grid to 2 x 2
           "decoder": {"name": str(folder)}, "tuning": {"mode": mode, "num_virtual_tokens": 2}}
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return AdapterConfig.from_dict(cfg)


def separate_loglik(model, image, question, choices) -> list[float]:
    """Mean log-probability of each candidate's answer tokens from its own full forward (the unshared reference)."""
    out = []
    for choice in choices:
        batch = model.processor([image], [question], [choice])
        logp = model(**batch, full_logits=True).logits[:, :-1].float().log_softmax(-1)
        labels = batch["labels"][:, 1:]
        picked = logp[labels != -100].gather(-1, labels[labels != -100][:, None])
        out.append(float(picked.mean()))
    return out


def check_inference_paths(model) -> None:
    """Shared-prompt scoring equals separate scoring; batched (left-padded) answers equal one-by-one answers; one image
    asked several questions (its prefix KV computed once) gives the answers of asking one by one."""
    choices = [["yes", "no"], ["left", "right", "both lungs"]]
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    shared = model.score_choices(IMAGES, QUESTIONS, choices, return_loglik=True)
    for got, image, question, options in zip(shared, IMAGES, QUESTIONS, choices):
        assert np.allclose(got, separate_loglik(model, image, question, options), atol=1e-5)
    batched = model.answer(IMAGES, QUESTIONS, max_new_tokens=4)
    single = [model.answer([im], [q], max_new_tokens=4)[0] for im, q in zip(IMAGES, QUESTIONS)]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(abs(a.score - b.score) < 1e-4 and a.num_tokens == b.num_tokens for a, b in zip(batched, single))
    heads = []
    original = model._shared_head
    model._shared_head = lambda *a: heads.append(original(*a)) or heads[-1]
    try:
        reused = model.answer([IMAGES[0]] * 2, QUESTIONS, max_new_tokens=4)
    finally:
        del model._shared_head
    alone = [model.answer([IMAGES[0]], [q], max_new_tokens=4)[0] for q in QUESTIONS]
    assert [a.text for a in reused] == [a.text for a in alone]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(reused, alone))
    sharing = not model.config.tuning.method.soft_prompt and model.config.template.name == "plain"
    assert (heads[0] is not None) == sharing  # the shared-head path really ran where it applies
    after = model.decoder.state_dict()  # LoRA folded into temporary weights for inference; originals untouched
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def perturb_trainable(model) -> None:
    """Move every trainable tensor off its init (LoRA B starts at zero) so a failed load would show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("mode", TUNING_MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mapper", sorted(MAPPERS))
def test_adapter_table(tiny_decoders, tmp_path, mapper, family, mode):
    if MAPPERS[mapper].pools_grid and family != FAMILIES[0]:  # a mapper's own exactness is tested elsewhere
        pytest.skip("grid-pooling mappers (gemma3: tests/test_vlm_gemma3.py) run the table on one decoder family")
    method = TUNING_MODES[mode]  # expectations come from the mode's attributes, never from its name
    model = MedVQAAdapter(make_config(tiny_decoders[family], mapper, mode))
    report = model.parameter_report()
    assert 0 < report["all"]["trainable"] < report["all"]["total"]
    assert report["mapper"]["trainable"] == report["mapper"]["total"] > 0
    assert report["encoder"]["trainable"] == 0
    assert (report["decoder"]["trainable"] > 0) == method.trains_decoder
    assert (report["lora"]["total"] > 0) == method.uses_peft_files

    # forward + backward: loss only on answer tokens (+ EOS), gradients only where training
    out = model(**model.processor(IMAGES, QUESTIONS, ANSWERS), full_logits=True)
    B, T, V = out.logits.shape
    assert (B, V) == (2, len(model.tokenizer)) and out.labels.shape == (B, T) and torch.isfinite(out.loss)
    n_answer = [len(model.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 1 for a in ANSWERS]
    assert (out.labels != -100).sum(1).tolist() == n_answer
    last_label = out.labels[torch.arange(B), (out.labels != -100).cumsum(1).argmax(1)]
    assert all(int(t) == model.tokenizer.eos_token_id for t in last_label)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.encoder.parameters())

    # the loss computed at supervised positions only equals the loss over full logits
    model.eval()
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    with torch.no_grad():
            assert abs(float(model(**batch).loss) - float(model(**batch, full_logits=True).loss)) < 1e-5
    check_inference_paths(model)
    model.train()

    # inference
    answers = model.answer(IMAGES, QUESTIONS, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a.text, str) and a.score <= 0 and a.num_tokens >= 1 for a in answers)
    probs = model.score_choices(IMAGES, QUESTIONS, [["yes", "no"], ["left", "right", "both lungs"]])
    assert [len(p) for p in probs] == [2, 3] and all(abs(sum(p) - 1) < 1e-5 for p in probs)

    # save -> load: identical logits; only trained tensors in the folder
    perturb_trainable(model)
    model.eval()
    before = model(**model.processor(IMAGES, QUESTIONS, ANSWERS)).logits
    folder = model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(str(folder / "mapper.safetensors"))
    allowed = ("mapper.", "decoder.") if method.trains_decoder else ("mapper.",)
    assert tensors and all(k.startswith(allowed) for k in tensors)
    if method.uses_peft_files:
        peft_keys = load_file(str(folder / "adapter_model.safetensors"))
        marker = "prompt_embeddings" if method.soft_prompt else "lora_"
        assert peft_keys and all(marker in k for k in peft_keys)
    else:
        assert not (folder / "adapter_model.safetensors").exists()
    loaded = MedVQAAdapter.from_pretrained(folder).eval()
    assert torch.allclose(before, loaded(**loaded.processor(IMAGES, QUESTIONS, ANSWERS)).logits, atol=1e-5)
    assert json.loads((folder / "prefixvqa_config.json").read_text())["fingerprints"]["decoder"]


@pytest.mark.parametrize("mode", [name for name, method in TUNING_MODES.items() if method.uses_peft_files])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_alone_loads_adapter_part(tiny_decoders, tmp_path, family, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = MedVQAAdapter(make_config(tiny_decoders[family], "mlp", mode)).eval()
    perturb_trainable(model)
    folder = model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_decoders[family]))
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = model.tokenizer("is there a lesion in the lung", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = model.decoder(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_json_round_trip_and_validation():
    cfg = AdapterConfig.from_dict({"mapper": {"kind": "resampler", "prefix_length": 32},
                                   "encoder": {"features": "patches"},
                                   "tuning": {"mode": "lora", "target_modules": ["q_proj"]}})
    assert AdapterConfig.from_json(cfg.to_json()) == cfg
    assert AdapterConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()
    with pytest.raises(ConfigError, match="mapper.kind"):
        AdapterConfig.from_dict({"mapper": {"kind": "nope"}})
    with pytest.raises(ConfigError, match="unknown field"):
        AdapterConfig.from_dict({"mapper": {"prefix_lenght": 3}})
    with pytest.raises(ConfigError, match="encoder.features='pooled'"):
        AdapterConfig.from_dict({"mapper": {"kind": "mlp"}, "encoder": {"features": "patches"}})
    with pytest.raises(ConfigError, match="quantized"):
        AdapterConfig.from_dict({"decoder": {"quantization": "4bit"}, "tuning": {"mode": "full"}})
    assert cfg.replace(mapper__prefix_length=4).mapper.prefix_length == 4
    with pytest.raises(ConfigError, match="unknown field"):
        cfg.replace(mapper__nope=1)


def test_allowed_values_are_spelled_once_and_read_by_validation():
    """Each closed set is one `Literal` (config.py): validation, the module tuples and the mapper registry agree."""
    import typing

    from prefixvqa import config as c
    from prefixvqa.mappers import _ACT

    assert sorted(MAPPERS) == sorted(c.MAPPER_KINDS)  # the registry's names are the Literal's (CLI choices, docs)
    assert set(_ACT) == set(c.ACTIVATIONS)
    hints = typing.get_type_hints(c.MapperConfig)
    assert c.allowed_values(hints["kind"]) == c.MAPPER_KINDS
    assert c.allowed_values(typing.get_type_hints(c.DecoderConfig)["quantization"]) == ("8bit", "4bit", None)
    assert set(c.QUANTIZATIONS) == {None, "8bit", "4bit"}
    for section, name, bad in [("encoder", "features", "grid"), ("mapper", "activation", "swish"),
                               ("decoder", "dtype", "float64"), ("decoder", "quantization", "2bit"),
                               ("template", "image_position", "middle"), ("template", "start", "eos"),
                               ("tuning", "bias", "some")]:
        with pytest.raises(ConfigError, match=f"{section}.{name}={bad!r} is not one of"):
            AdapterConfig.from_dict({section: {name: bad}})
    with pytest.raises(ConfigError, match="quote it"):  # YAML's unquoted `no` is a boolean, not "none"
        AdapterConfig.from_dict({"template": {"start": False}})
    # capabilities are class attributes: the pooled-only rule names every kind that reads patch tokens
    with pytest.raises(ConfigError, match="query_decoder"):
        AdapterConfig.from_dict({"mapper": {"kind": "mlp"}, "encoder": {"features": "patches"}})
    assert [k for k, cls in MAPPERS.items() if cls.per_token] == ["linear", "mlp2x_gelu"]


def test_strict_loading_names_what_differs(tiny_decoders, other_gpt2, tmp_path):
    from prefixvqa.fileio import write_manifest

    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"]))
    folder = model.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="decoder base model"):
        MedVQAAdapter.from_pretrained(folder, decoder={"name": str(other_gpt2)})
    MedVQAAdapter.from_pretrained(folder, strict=False, decoder={"name": str(other_gpt2)})  # explicit opt-out works

    tensors = load_file(str(folder / "mapper.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(folder / "mapper.safetensors"))
    with pytest.raises(AdapterLoadError, match=r"mapper\.safetensors (has|does not match)"):
        MedVQAAdapter.from_pretrained(folder)  # the manifest catches any edit first ...
    write_manifest(folder)  # ... an edited folder with a fresh manifest gets the strict structural checks
    with pytest.raises(AdapterLoadError, match=f"mapper.safetensors: missing keys.*{dropped}"):
        MedVQAAdapter.from_pretrained(folder)

    folder = model.save_pretrained(tmp_path / "b")
    cfg = json.loads((folder / "prefixvqa_config.json").read_text())
    cfg["mapper"]["prefix_length"] = 5
    (folder / "prefixvqa_config.json").write_text(json.dumps(cfg))
    write_manifest(folder)
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        MedVQAAdapter.from_pretrained(folder)

    folder = model.save_pretrained(tmp_path / "c")
    peft_cfg = json.loads((folder / "adapter_config.json").read_text())
    peft_cfg["r"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(peft_cfg))
    write_manifest(folder)
    with pytest.raises(AdapterLoadError, match="adapter_config.json: r=4"):
        MedVQAAdapter.from_pretrained(folder)
    with pytest.raises(AdapterLoadError, match="not found"):
        MedVQAAdapter.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("name", ["mapper.safetensors", "adapter_model.safetensors", "prefixvqa_config.json"])
def test_flipped_byte_in_adapter_is_refused_naming_the_file(tiny_decoders, tmp_path, name):
    folder = MedVQAAdapter(make_config(tiny_decoders["gpt2"])).save_pretrained(tmp_path / "a")
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match=f"{name} does not match its sha256"):
        MedVQAAdapter.from_pretrained(folder)


def test_save_is_atomic_and_replaces(tiny_decoders, tmp_path, monkeypatch):
    import prefixvqa.adapter_io as io

    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"]))
    folder = model.save_pretrained(tmp_path / "a")
    first = (folder / "mapper.safetensors").read_bytes()
    monkeypatch.setattr(io, "model_card", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    perturb_trainable(model)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(folder)
    assert (folder / "mapper.safetensors").read_bytes() == first  # the old adapter is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left behind


@pytest.mark.parametrize("template", sorted(n for n, t in TEMPLATES.items() if not t.uses_tokenizer_template))
@pytest.mark.parametrize("position", ["before_question", "after_question"])
def test_templates_place_image_and_mask_prompt(tiny_decoders, template, position):
    template_cfg = {"name": template, "image_position": position}
    model = MedVQAAdapter(make_config(tiny_decoders["llama"], template=template_cfg))
    pieces, answer = model.processor.tokenize("which side?", "left")[:2]
    assert len(pieces) == 2 and (answer[-1] == model.tokenizer.eos_token_id) == TEMPLATES[template].eos
    text = model.tokenizer.decode(pieces[0] + pieces[1])
    assert ("which side?" in text) == ("{question}" in getattr(TEMPLATES[template], position))  # ClipCap: caption only
    out = model(**model.processor(IMAGES[:1], ["which side?"], ["left"]))
    prompt_len = sum(map(len, pieces)) + 3  # 3 prefix vectors
    assert (out.labels[0, :prompt_len] == -100).all() and (out.labels[0, prompt_len:] != -100).all()


def test_few_shot_prompt_places_one_prefix_per_image(tiny_decoders):
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "resampler", "frozen"))
    shots = [[("is there a lesion?", "yes"), ("is there a lesion?", "no")]]
    pieces = model.processor.tokenize("is there a lesion?", None, shots[0]).pieces
    assert len(pieces) == 4  # three image slots
    images = [[IMAGES[0], IMAGES[1], IMAGES[0]]]
    out = model(**model.processor(images, ["is there a lesion?"], ["yes"], shots=shots))
    assert torch.isfinite(out.loss)
    assert len(model.answer(images, ["is there a lesion?"], shots=shots, max_new_tokens=2)) == 1
    assert len(model.score_choices(images, ["is there a lesion?"], [["yes", "no"]], shots=shots)[0]) == 2


def test_generation_options(tiny_decoders):
    model = MedVQAAdapter(make_config(tiny_decoders["llama"])).eval()
    greedy = model.answer(IMAGES, QUESTIONS, max_new_tokens=4)
    assert greedy == model.answer(IMAGES, QUESTIONS, max_new_tokens=4)  # deterministic
    beams = model.answer(IMAGES, QUESTIONS, max_new_tokens=4, num_beams=3)
    torch.manual_seed(0)
    sampled = model.answer(IMAGES, QUESTIONS, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    assert len(beams) == len(sampled) == 2
    # batched answers equal one-by-one answers (left padding is handled)
    single = [model.answer([im], [q], max_new_tokens=4)[0] for im, q in zip(IMAGES, QUESTIONS)]
    assert [a.text for a in single] == [a.text for a in greedy]
    assert all(abs(a.score - b.score) < 1e-3 for a, b in zip(single, greedy))


def test_grayscale_and_16bit_inputs(tiny_decoders):
    import numpy as np

    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"]))
    img16 = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    feats = model.encode_images([img16, Image.new("L", (30, 30), 5), IMAGES[0]])
    assert feats.shape == (3, 1, 32) and torch.isfinite(feats).all()


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_patch_tokens_from_vit_and_conv_towers(tower):
    """Patch features are row-major tokens for a ViT's patches and for a conv tower's grid (demo_smollm2 uses the
    latter); a token's content must follow its image region, so a left-side change moves left tokens most."""
    import torch

    from prefixvqa.config import EncoderConfig
    from prefixvqa.vision import VisionEncoder

    cfg = (dict(TINY_ENCODER) if tower == "vit" else
           {"name": "RN50", "pretrained": None,
            "model_overrides": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                                                "head_width": 8},
                                "text_cfg": TINY_ENCODER["model_overrides"]["text_cfg"]}})
    encoder = VisionEncoder.from_config(EncoderConfig(**cfg, features="patches")).eval()
    side = {"vit": 4, "resnet": 2}[tower]  # 32 px / patch 8; 64 px / conv stride 32
    x = torch.zeros(2, 3, *encoder.preprocess_size())
    x[1, :, :, : x.shape[-1] // 2] = 1.0  # brighten the left half of the second image
    with torch.no_grad():
        tokens = encoder(x)
    assert tokens.shape[:2] == (2, side * side) and encoder.output_shape() == tuple(tokens.shape[1:])
    change = (tokens[1] - tokens[0]).norm(dim=-1).view(side, side)  # (rows, cols)
    assert change[:, : side // 2].sum() > change[:, side // 2:].sum()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_equals_a_hand_built_transformers_loss(tiny_decoders, family):
    """The model's prefix placement, label masking and shift give exactly the loss plain transformers computes from
    hand-built inputs_embeds/labels ([BOS] prefix "Question: q Answer:" " a" EOS, right-padded)."""
    model = MedVQAAdapter(make_config(tiny_decoders[family], template={"name": "plain"}))
    perturb_trainable(model)
    model.eval()
    questions, answers = ["Is there a lesion?", "Which side is it on?"], ["yes", "left side"]
    images = [Image.fromarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8))
              for i in range(len(questions))]
    with torch.no_grad():
        prefix = model.mapper(model.encode_images(images))
        embeds, mask, lab = plain_transformers_batch(model, prefix, questions, answers)
        peer = model.decoder(inputs_embeds=embeds, attention_mask=mask, labels=lab).loss
        ours = model(**model.processor(images, questions, answers)).loss
    torch.testing.assert_close(ours, peer)


def test_build_decoder_is_seeded_without_touching_the_global_rng(tiny_decoders, tmp_path):
    from prefixvqa.testing import build_decoder

    torch.manual_seed(7)
    before = torch.get_rng_state()
    again = build_decoder(tmp_path / "gpt2", "gpt2")
    assert torch.equal(torch.get_rng_state(), before)
    # same seed, same weights (build_decoder no longer reseeds the caller's generator to get them)
    assert (again / "model.safetensors").read_bytes() == (tiny_decoders["gpt2"] / "model.safetensors").read_bytes()


def test_frozen_decoder_runs_without_dropout_in_training(tiny_decoders):
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear", "frozen",
                                      decoder={"model_config": None})).train()
    model.decoder.config.resid_pdrop = 0.5
    for module in model.decoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    batch = model.processor(IMAGES, QUESTIONS, ANSWERS)
    assert not model.decoder.training and model.mapper.training
    assert float(model(**batch).loss) == float(model(**batch).loss)  # no dropout in the frozen decoder


def test_image_start_end_vectors_wrap_every_prefix_and_are_saved(tiny_decoders, tmp_path):
    """LLaVA-Med's mm_use_im_start_end: L + 2 slots per image, the two ends learned with the mapper and saved."""
    plain = MedVQAAdapter(make_config(tiny_decoders["llama"], "linear"))
    model = MedVQAAdapter(make_config(tiny_decoders["llama"], "linear", template={"image_start_end": True}))
    assert model.processor.image_seq_length == plain.processor.image_seq_length + 2
    mean = model.decoder.get_input_embeddings().weight.float().mean(0)
    assert torch.allclose(model.mapper.delimiters, mean.expand(2, -1))
    out = model(**model.processor(IMAGES, QUESTIONS, ANSWERS))
    out.loss.backward()
    assert model.mapper.delimiters.grad is not None and model.mapper.delimiters.grad.abs().sum() > 0
    with torch.no_grad():
        model.mapper.delimiters.add_(1.0)
    loaded = MedVQAAdapter.from_pretrained(model.save_pretrained(tmp_path / "a"))
    assert torch.equal(loaded.mapper.delimiters, model.mapper.delimiters)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_stop_string_ends_score_and_token_count_batched_as_alone(tiny_decoders, num_beams):
    """#8.2: a row that stops on a stop string is scored over its tokens up to the stop, batched as alone (padding
    steps after it count for nothing)."""
    torch.manual_seed(0)
    model = MedVQAAdapter(make_config(tiny_decoders["gpt2"], "linear", template={"name": "prefix_vqa"})).eval()
    free = model.answer(IMAGES, QUESTIONS, max_new_tokens=6, num_beams=num_beams, stop=[])
    ids = model.tokenizer(free[0].text, add_special_tokens=False)["input_ids"]
    stop = next((model.tokenizer.decode(ids[k:k + 1]) for k in range(1, len(ids))
                 if model.tokenizer.decode(ids[k:k + 1]).strip()), None)
    if stop is None:
        pytest.skip("the tiny model's answer has no second token to stop on")
    batched = model.answer(IMAGES, QUESTIONS, max_new_tokens=6, num_beams=num_beams, stop=[stop])
    alone = [model.answer([im], [q], max_new_tokens=6, num_beams=num_beams, stop=[stop])[0]
             for im, q in zip(IMAGES, QUESTIONS)]
    assert batched[0].num_tokens < free[0].num_tokens and stop not in batched[0].text
    for b, a in zip(batched, alone):
        assert b.text == a.text and b.num_tokens == a.num_tokens and abs(b.score - a.score) < 1e-4
