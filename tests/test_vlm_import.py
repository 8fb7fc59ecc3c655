"""`MedVQAAdapter.from_vlm`: tiny random checkpoints written as the releases lay them out (LLaVA / LLaVA-Med v1.5,
a LLaVA LoRA release as LLaVA-Rad ships it, transformers' LlavaForConditionalGeneration) give the logits and greedy
answers of transformers' own LlavaForConditionalGeneration, after converting the layout as transformers' conversion
script does; the imported adapter fine-tunes with LoRA on real VQA-RAD files and reloads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from prefixvqa.testing import build_decoder  # noqa: E402
from test_vision_backends import llava_expand2square, picture  # noqa: E402

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
VQA_RAD = REAL / "vqa_rad"
QUESTIONS = ["is there a lesion in the chest ?", "which side ?"]


def build_clip(folder: Path) -> Path:
    """A tiny full CLIPModel (text + vision, as openai/clip-vit-large-patch14-336 ships) + CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from prefixvqa.rng import seeded

    cfg = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                    "num_attention_heads": 2, "image_size": 28, "patch_size": 7},
                     projection_dim=16)
    with seeded(1):
        CLIPModel(cfg).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(str(folder))
    return folder


def build_release(root: Path, *, text: str = "mistral", projector: str = "mlp2x_gelu", layer: int = -2,
                  feature: str = "patch", aspect: str = "pad", start_end: bool = False, sizes: dict | None = None
                  ) -> dict:
    """A LLaVA-layout checkpoint as LLaVA's trainer saves it (config.json with mm_* keys, the language model's
    tensors under their LlamaForCausalLM/MistralForCausalLM names, `model.mm_projector.*` beside them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixvqa.rng import seeded

    tower = build_clip(root / "clip")
    lm_dir = build_decoder(root / "lm", text, sizes=sizes)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    if start_end:  # LLaVA adds the tokens and resizes the embeddings (initialize_vision_tokenizer)
        tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
        lm.resize_token_embeddings(len(tok), mean_resizing=True)
    E, D = lm.config.hidden_size, 32
    with seeded(2):
        if projector == "linear":
            proj = {"model.mm_projector.weight": torch.randn(E, D) * 0.2, "model.mm_projector.bias": torch.randn(E)}
        else:
            proj = {"model.mm_projector.0.weight": torch.randn(E, D) * 0.2, "model.mm_projector.0.bias": torch.randn(E),
                    "model.mm_projector.2.weight": torch.randn(E, E) * 0.2, "model.mm_projector.2.bias": torch.randn(E)}
    out = root / "llava"
    out.mkdir()
    save_file({**{k: v.contiguous() for k, v in lm.state_dict().items()}, **proj}, str(out / "model.safetensors"))
    config = lm.config.to_dict()
    config.update(model_type={"mistral": "llava_mistral", "llama": "llava"}[text],
                  architectures=[{"mistral": "LlavaMistralForCausalLM", "llama": "LlavaLlamaForCausalLM"}[text]],
                  mm_vision_tower=str(tower), mm_hidden_size=D, mm_projector_type=projector,
                  mm_vision_select_layer=layer, mm_vision_select_feature=feature, mm_use_im_start_end=start_end,
                  mm_use_im_patch_token=False, image_aspect_ratio=aspect, mm_patch_merge_type="flat",
                  tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, tokenizer_model_max_length=2048)
    (out / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(str(out))
    return {"folder": out, "tower": tower, "lm": lm, "tok": tok, "projector": proj, "text": text}


def convert_to_hf(release: dict, folder: Path, layer: int, feature: str) -> Path:
    """The checkpoint in transformers' LlavaForConditionalGeneration format, converted as
    transformers' convert_llava_weights_to_hf.py does: `<image>` token added, projector -> multi_modal_projector
    .linear_1/2, language model under `language_model.`, tower weights under `vision_tower.`."""
    from transformers import CLIPModel, LlavaConfig

    tok = release["tok"]
    tok.add_tokens(["<image>"], special_tokens=True)
    lm = release["lm"]
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    state = {}
    for k, v in lm.state_dict().items():
        state[("language_model." + k)] = v
    for k, v in release["projector"].items():
        state[k.replace("model.mm_projector.0", "multi_modal_projector.linear_1")
               .replace("model.mm_projector.2", "multi_modal_projector.linear_2")] = v
    clip = CLIPModel.from_pretrained(str(release["tower"]))
    for k, v in clip.vision_model.state_dict().items():
        state["vision_tower.vision_model." + k] = v
    config = LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=lm.config.to_dict(),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=layer,
                         vision_feature_select_strategy="default" if feature == "patch" else "full",
                         projector_hidden_act="gelu")
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    from transformers import CLIPImageProcessor

    CLIPImageProcessor.from_pretrained(str(release["tower"])).save_pretrained(str(folder))
    return folder


def reference_inputs(model, release_tok, image: Image.Image, question: str, pad: bool, image_id: int):
    """input_ids with the image token N times where the checkpoint puts the image, and LLaVA's pixel values."""
    from transformers import AutoImageProcessor

    sample = model.processor.tokenize(question)
    n = model.num_image_tokens
    start_end = model.config.template.image_start_end
    middle = [image_id] * n
    if start_end:
        middle = [release_tok.convert_tokens_to_ids("<im_start>")] + middle + \
                 [release_tok.convert_tokens_to_ids("<im_end>")]
    ids = torch.tensor([sample.pieces[0] + middle + sample.pieces[1]])
    proc = AutoImageProcessor.from_pretrained(model.config.encoder.name, backend="pil")  # the PIL one LLaVA used
    if pad:
        image = llava_expand2square(image, tuple(int(x * 255) for x in proc.image_mean))
    return ids, proc(images=image, return_tensors="pt")["pixel_values"]


CASES = [  # (text model, projector, select layer, select feature, image_aspect_ratio, im_start/im_end)
    ("mistral", "mlp2x_gelu", -2, "patch", "pad", False),  # LLaVA-Med v1.5
    ("llama", "mlp2x_gelu", -1, "cls_patch", "square", True),  # LLaVA-1.5 layout with v1.0-style delimiters
]


@pytest.mark.parametrize("text, projector, layer, feature, aspect, start_end", [
    pytest.param(*CASES[0], marks=pytest.mark.slow), CASES[1]])
def test_llava_layout_equals_transformers_llava(tmp_path, text, projector, layer, feature, aspect, start_end):
    from transformers import LlavaForConditionalGeneration

    from prefixvqa.model import MedVQAAdapter

    release = build_release(tmp_path, text=text, projector=projector, layer=layer, feature=feature, aspect=aspect,
                            start_end=start_end)
    model = MedVQAAdapter.from_vlm(str(release["folder"]), decoder={"dtype": "float32"},
                                   tuning={"mode": "frozen"}).eval()
    vocab = len(release["tok"])
    hf_dir = convert_to_hf(release, tmp_path / "hf", layer, feature)
    ref = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    image_id = ref.config.image_token_id
    image = picture(45, 30)
    n_patches = (28 // 7) ** 2 + (feature == "cls_patch")
    assert model.num_image_tokens == n_patches
    for question in QUESTIONS:
        ids, pixels = reference_inputs(model, release["tok"], image, question, aspect == "pad", image_id)
        batch = model.processor([image], [question])
        assert torch.equal(batch["pixel_values"], pixels)
        with torch.no_grad():
            want = ref(input_ids=ids, pixel_values=pixels).logits[..., :vocab]
            got = model(**batch, full_logits=True).logits
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        new = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                           suppress_tokens=[image_id], eos_token_id=release["tok"].eos_token_id,
                           pad_token_id=release["tok"].eos_token_id)[0, ids.shape[1]:]
        text_ref = release["tok"].decode(new, skip_special_tokens=True)
        for stop in model.processor.stop_strings():
            text_ref = text_ref.split(stop)[0]
        (answer,) = model.answer([image], [question], max_new_tokens=6)
        assert answer.text == text_ref.strip() and answer.num_tokens >= 1
    # transformers' format itself imports to the same model
    hf_model = MedVQAAdapter.from_vlm(str(hf_dir), decoder={"dtype": "float32"}, tuning={"mode": "frozen"},
                                      template={"name": model.config.template.name}).eval()
    if not start_end:
        batch = model.processor([image], [QUESTIONS[0]])
        with torch.no_grad():
            a, b = model(**batch, full_logits=True).logits, hf_model(**batch, full_logits=True).logits[..., :vocab]
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_linear_projector_equals_its_transformers_parts(tmp_path):
    """LlavaForConditionalGeneration has no `linear` projector: the reference is CLIPVisionModel's hidden state, one
    F.linear, and the language model's forward on the spliced embeddings."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, CLIPVisionModel

    from prefixvqa.model import MedVQAAdapter

    release = build_release(tmp_path, text="llama", projector="linear", aspect="square")
    model = MedVQAAdapter.from_vlm(str(release["folder"]), decoder={"dtype": "float32"},
                                   tuning={"mode": "frozen"}).eval()
    image = picture(30, 30)
    tower = CLIPVisionModel.from_pretrained(str(release["tower"])).eval()
    pixels = AutoImageProcessor.from_pretrained(str(release["tower"]), backend="pil")(
        images=image, return_tensors="pt")["pixel_values"]
    lm = AutoModelForCausalLM.from_pretrained(str(release["folder"] / ".." / "lm")).eval()
    sample = model.processor.tokenize(QUESTIONS[0])
    with torch.no_grad():
        feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        prefix = torch.nn.functional.linear(feats, release["projector"]["model.mm_projector.weight"],
                                            release["projector"]["model.mm_projector.bias"])
        emb = lm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor([sample.pieces[0]])), prefix, emb(torch.tensor([sample.pieces[1]]))], 1)
        want = lm(inputs_embeds=embeds).logits
        got = model(**model.processor([image], [QUESTIONS[0]]), full_logits=True).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_unknown_or_incomplete_layouts_name_file_and_key(tmp_path):
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.vlm_layouts import LayoutError

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_mistral", "mm_vision_tower": "x"}))
    with pytest.raises(LayoutError, match=r"ckpt/config.json: missing key\(s\) \['mm_projector_type', "
                                          r"'mm_hidden_size'\]"):
        MedVQAAdapter.from_vlm(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "blip2"}))
    with pytest.raises(LayoutError, match="config.json: model_type='blip2' is not a layout"):
        MedVQAAdapter.from_vlm(str(folder))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(LayoutError, match="config.json: missing key 'model_type'"):
        MedVQAAdapter.from_vlm(str(folder))


def vqa_rad_records():
    from prefixvqa.data import load_records

    records = load_records({"format": "vqa_rad", "path": VQA_RAD, "split": "test", "check_images": False})
    return [r for r in records if Path(r.image).is_file()]


@pytest.mark.slow
def fine_tune_and_save(folder: str, records: list, tmp_path: Path):
    """LoRA + projector on 16 real VQA-RAD records for 4 epochs (the loss must fall), saved to tmp_path/adapter."""
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.train import TrainConfig, train

    model = MedVQAAdapter.from_vlm(folder, decoder={"dtype": "float32"},
                                   tuning={"r": 8, "alpha": 16, "dropout": 0.0}, template={"max_length": 96})
    run = train(model, records[:16], None, TrainConfig(
        output_dir=str(tmp_path / "run"), epochs=4, batch_size=4, lr={"lora": 3e-3, "mapper": 1e-3},
        eval_every_epoch=False, log_every=1, progress=False, tensorboard=False, plot=False))
    losses = [h["loss"] for h in run.history if "loss" in h]
    assert len(losses) >= 8 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    model.save_pretrained(tmp_path / "adapter")
    return model


def reload_answers_equal(model, folder: str, layout: str, records: list, tmp_path: Path):
    """Reload tmp_path/adapter: it names the release (path, layout, fingerprint) and answers held-out records as the
    trained model did; returns the reloaded model."""
    from prefixvqa.model import MedVQAAdapter

    loaded = MedVQAAdapter.from_pretrained(tmp_path / "adapter")
    assert (loaded.config.decoder.name, loaded.config.decoder.layout) == (folder, layout)
    assert loaded.config.fingerprints["decoder"] == model.base_fingerprints["decoder"]
    images, questions = [r.image for r in records[16:20]], [r.question for r in records[16:20]]
    want = [(a.text, a.score) for a in model.eval().answer(images, questions, max_new_tokens=5)]
    assert [(a.text, a.score) for a in loaded.answer(images, questions, max_new_tokens=5)] == want
    return loaded


def test_llava_med_v15_layout_fine_tunes_on_vqa_rad_saves_and_reloads_strictly(tmp_path):
    from safetensors.torch import load_file

    from prefixvqa.adapter_io import AdapterLoadError
    from prefixvqa.model import MedVQAAdapter

    records = vqa_rad_records()
    assert len(records) >= 20  # the real VQA-RAD files of ../shared/realdata (10 images)
    release = build_release(tmp_path)
    folder = str(release["folder"])
    model = fine_tune_and_save(folder, records, tmp_path)
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"mapper.safetensors", "adapter_model.safetensors"} <= saved
    assert not any(k.startswith(("encoder.", "decoder.")) for k in load_file(str(tmp_path / "adapter" /
                                                                               "mapper.safetensors")))
    reload_answers_equal(model, folder, "llava", records, tmp_path)
    # another checkpoint at the same path is not the base the adapter was trained on: refused
    weights = load_file(str(release["folder"] / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] + 0.01
    save_file(weights, str(release["folder"] / "model.safetensors"))
    with pytest.raises(AdapterLoadError, match="decoder"):
        MedVQAAdapter.from_pretrained(tmp_path / "adapter")


def build_lora_release(root: Path) -> dict:
    """A LLaVA LoRA release as LLaVA-Rad ships one: config.json (mm_* keys, an open_clip tower given by
    vision_tower_config), the LoRA (adapter_config.json + weights) over a base Vicuna-style LM, and the projector in
    `non_lora_trainables.bin` under its `base_model.model.model.mm_projector.*` names (a PyTorch file, as released)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixvqa.rng import seeded

    tower = build_clip(root / "clip")
    base_dir = build_decoder(root / "vicuna", "llama")
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with seeded(3):
        peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
        E = lm.config.hidden_size
        proj = {"model.mm_projector.0.weight": torch.randn(E, 32) * 0.2, "model.mm_projector.0.bias": torch.randn(E),
                "model.mm_projector.2.weight": torch.randn(E, E) * 0.2, "model.mm_projector.2.bias": torch.randn(E)}
    release = root / "llavarad"
    peft_model.save_pretrained(str(release))
    torch.save({"base_model.model." + k: v for k, v in proj.items()}, release / "non_lora_trainables.bin")
    config = lm.config.to_dict()
    config.update(model_type="llava", mm_vision_tower="biomedclip_cxr_518", mm_hidden_size=32,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  mm_use_im_start_end=False, image_aspect_ratio="pad",
                  vision_tower_config="biomedclipcxr_518.json", vision_tower_checkpoint="biomedclipcxr_518.pt")
    (release / "config.json").write_text(json.dumps(config))
    merged = peft_model.merge_and_unload()
    return {"folder": release, "tower": tower, "lm": merged, "projector": proj,
            "tok": AutoTokenizer.from_pretrained(str(base_dir))}


def test_llava_lora_release_equals_its_merged_llava(tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from prefixvqa.model import MedVQAAdapter

    release = build_lora_release(tmp_path)
    assert MedVQAAdapter.from_vlm  # the release's own open_clip tower: test_llava_rad_release_with_its_own_tower
    model = MedVQAAdapter.from_vlm(str(release["folder"]), decoder={"dtype": "float32"}, tuning={"mode": "frozen"},
                                   encoder={"backend": "transformers", "name": str(release["tower"]),
                                            "pretrained": None}).eval()
    assert "torch.load(weights_only=True)" in capsys.readouterr().out  # the .bin file is named when read
    assert model.config.template.name == "vicuna_v1" and model.config.decoder.layout == "llava_lora"
    vocab = len(release["tok"])
    ref = LlavaForConditionalGeneration.from_pretrained(
        str(convert_to_hf(release, tmp_path / "hf", -2, "patch")), dtype=torch.float32).eval()
    image = picture(40, 50)
    ids, pixels = reference_inputs(model, release["tok"], image, QUESTIONS[0], True, ref.config.image_token_id)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits[..., :vocab]
        got = model(**model.processor([image], [QUESTIONS[0]]), full_logits=True).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_released_weights_preset_equals_from_vlm_and_exports_merged(tmp_path):
    from prefixvqa.export import export_merged
    from prefixvqa.model import MedVQAAdapter

    release = build_release(tmp_path)  # laid out as LLaVA-Med v1.5
    over = {"encoder": {"name": str(release["tower"])}, "decoder": {"name": str(release["folder"]), "dtype": "float32"},
            "tuning": {"r": 4, "alpha": 8, "dropout": 0.0}, "template": {"max_length": 96}}
    preset = MedVQAAdapter.from_preset("llava_med_v15_mistral_7b", **over).eval()
    vlm = MedVQAAdapter.from_vlm(str(release["folder"]), **over).eval()
    assert preset.config.encoder == vlm.config.encoder and preset.config.mapper == vlm.config.mapper
    image = picture(50, 30)
    batch = preset.processor([image], [QUESTIONS[0]], ["no"])
    with torch.no_grad():
        for name, p in preset.decoder.named_parameters():  # a LoRA that changes the answer, as training leaves it
            if "lora_B" in name:
                p.normal_(0, 0.1)
        vlm.load_state_dict(preset.state_dict())
        want = preset(**batch, full_logits=True).logits
        assert torch.equal(vlm(**batch, full_logits=True).logits, want)
    folder, _ = export_merged(preset, tmp_path / "export")
    merged = MedVQAAdapter.from_pretrained(folder)
    assert merged.config.decoder.layout is None and merged.config.tuning.mode == "frozen"
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch, full_logits=True).logits, want, rtol=1e-4, atol=1e-5)  # as test_tuning


#: LLaVA-Rad's tower config (biomedclipcxr_518.json) with a smaller trunk (DINOv2 ViT-S/14); the test runs it at 28 px
CXR_TOWER = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "vit_small_patch14_dinov2", "timm_model_pretrained": False,
                                             "timm_pool": "", "timm_proj": "linear", "image_size": 518},
             "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                          "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                          "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                          "context_length": 256}}


@pytest.mark.slow
def test_llava_rad_release_with_its_own_tower(tmp_path, capsys):
    """LLaVA-Rad as released: its open_clip tower given by a config file + checkpoint inside the release. The
    reference is LLaVA-Rad's own computation (open_clip_encoder.py VisionTower: patch_embed, _pos_embed, norm_pre,
    the blocks; hidden_states[-2][:, 1:]), its mlp2x_gelu projector and the merged language model."""
    import open_clip
    from open_clip.model import _build_vision_tower

    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.rng import seeded

    release = build_lora_release(tmp_path)
    folder = release["folder"]
    config = json.loads((folder / "config.json").read_text())
    config.update(mm_hidden_size=384, vision_tower_config="llava/model/multimodal_encoder/open_clip_encoder/"
                  "model_configs/biomedclip_cxr_518.json")  # a path of the training machine: the file is found in the release
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "biomedclipcxr_518.json").write_text(json.dumps(CXR_TOWER))  # the name LLaVA-Rad's release uses
    with seeded(4):
        visual = _build_vision_tower(CXR_TOWER["embed_dim"], CXR_TOWER["vision_cfg"]).eval()
        E = release["lm"].config.hidden_size
        proj = {"model.mm_projector.0.weight": torch.randn(E, 384) * 0.05, "model.mm_projector.0.bias": torch.randn(E),
                "model.mm_projector.2.weight": torch.randn(E, E) * 0.2, "model.mm_projector.2.bias": torch.randn(E)}
    torch.save({"state_dict": {"module.visual." + k: v for k, v in visual.state_dict().items()}},
               folder / "biomedclipcxr_518.pt")
    visual.set_input_size(28)  # what encoder.image_size=28 does (open_clip's force_image_size): a fast CPU test
    torch.save({"base_model.model." + k: v for k, v in proj.items()}, folder / "non_lora_trainables.bin")
    model = MedVQAAdapter.from_vlm(str(folder), decoder={"dtype": "float32"}, tuning={"mode": "frozen"},
                                   encoder={"image_size": 28}).eval()
    assert model.config.encoder.backend == "open_clip_file" and model.config.encoder.name == str(folder /
                                                                                         "biomedclipcxr_518.json")
    assert "biomedclipcxr_518.pt with torch.load(weights_only=True)" in capsys.readouterr().out
    image = picture(40, 50)
    pad = tuple(int(x * 255) for x in open_clip.OPENAI_DATASET_MEAN)
    pixels = open_clip.image_transform(28, is_train=False)(llava_expand2square(image, pad))[None]
    batch = model.processor([image], [QUESTIONS[0]])
    assert torch.equal(batch["pixel_values"], pixels)
    with torch.no_grad():
        trunk = visual.trunk
        x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
        states = [x]
        for block in trunk.blocks:
            x = block(x)
            states.append(x)
        feats = states[-2][:, 1:]
        h = torch.nn.functional.gelu(torch.nn.functional.linear(feats, proj["model.mm_projector.0.weight"],
                                                                proj["model.mm_projector.0.bias"]))
        prefix = torch.nn.functional.linear(h, proj["model.mm_projector.2.weight"], proj["model.mm_projector.2.bias"])
        sample = model.processor.tokenize(QUESTIONS[0])
        emb = release["lm"].get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor([sample.pieces[0]])), prefix, emb(torch.tensor([sample.pieces[1]]))], 1)
        want = release["lm"](inputs_embeds=embeds).logits
        got = model(**batch, full_logits=True).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_qlora_on_an_imported_checkpoint(tmp_path):
    """QLoRA: the released language model read out of the LLaVA layout in 4-bit NF4, LoRA and the projector train."""
    pytest.importorskip("bitsandbytes")
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import QUANT_SIZES

    release = build_release(tmp_path, sizes=QUANT_SIZES["mistral"])
    assert_qlora_trains(MedVQAAdapter.from_vlm(str(release["folder"]), decoder={"quantization": "4bit",
                                                                                 "dtype": "float32"},
                                               tuning={"r": 4, "alpha": 8}, template={"max_length": 64}))


def assert_qlora_trains(model) -> None:
    """A 4-bit imported release: the base stays frozen, one step on real VQA-RAD records reaches mapper and LoRA."""
    assert model.parameter_report()["decoder"]["trainable"] == 0
    records = vqa_rad_records()[:2]
    model.set_trainable("mapper", "lora")
    out = model(**model.processor([r.image for r in records], [r.question for r in records],
                                  [r.answer for r in records]))
    out.loss.backward()
    grads = {g: any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in ps)
             for g, ps in model.parameter_groups().items() if g in ("mapper", "lora")}
    assert torch.isfinite(out.loss) and grads == {"mapper": True, "lora": True}


@pytest.mark.parametrize("name, needed", [
    ("llava_med_v15_mistral_7b", ["microsoft/llava-med-v1.5-mistral-7b", "openai/clip-vit-large-patch14-336"]),
    ("llava_rad", ["lmsys/vicuna-7b-v1.5", "microsoft/llava-rad", "biomedclipcxr_518.json"])])
def test_released_weights_presets_fail_fast_offline_naming_what_they_need(name, needed):
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.vision import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError) as err:
        MedVQAAdapter.from_preset(name)
    assert all(n in str(err.value) for n in needed), str(err.value)


def test_a_released_checkpoint_answers_and_evaluates_in_one_command(tmp_path, capsys):
    """`--adapter vlm:SOURCE`: the release as released (frozen), through the same parser as every adapter name."""
    from prefixvqa.cli import main
    from prefixvqa.model import MedVQAAdapter

    release = build_release(tmp_path)
    source = f"vlm:{release['folder']}"
    model = MedVQAAdapter.from_pretrained(source)  # as the CLI loads it
    assert model.config.tuning.mode == "frozen" and not model.training
    direct = MedVQAAdapter.from_vlm(str(release["folder"]), tuning={"mode": "frozen"})
    records = vqa_rad_records()[:2]
    images, questions = [r.image for r in records], [r.question for r in records]
    want = [a.text for a in direct.eval().answer(images, questions, max_new_tokens=3)]
    assert [a.text for a in model.answer(images, questions, max_new_tokens=3)] == want
    capsys.readouterr()
    assert main(["answer", "--adapter", source, "--image", str(images[0]), questions[0], "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[0] == want[0].strip()


def test_a_released_pytorch_file_holding_objects_is_refused_not_unpickled(tmp_path):
    """The importer reads `.bin` files with weights_only=True only: a file holding any other object is one line."""
    from prefixvqa.vlm_layouts import LayoutError, load_tensor_file

    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    torch.save({"w": torch.ones(2)}, str(good))  # the test writes what a release ships
    torch.save({"w": torch.ones(2), "obj": Path("x")}, str(bad))
    assert torch.equal(load_tensor_file(good)["w"], torch.ones(2))
    with pytest.raises(LayoutError, match="does not unpickle") as refused:
        load_tensor_file(bad)
    assert "\n" not in str(refused.value) and str(bad) in str(refused.value)
