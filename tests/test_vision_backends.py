"""The image-tower backends (`encoder.backend`): the transformers towers give exactly the model's own hidden states on
the image processor's pixels (LLaVA's feature selection and pad-to-square), and every path that takes an open_clip
tower (feature cache, few-shot retrieval, grounding maps, fit-check, export, save/load) takes each backend."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from prefixvqa.config import AdapterConfig, ConfigError, EncoderConfig  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.encoders import BACKENDS, build_encoder  # noqa: E402
from prefixvqa.testing import TINY_ENCODER, build_vision_tower, tiny_overrides, tiny_tower_encoder  # noqa: E402

KINDS = ("clip", "siglip", "dinov2")
CLASS_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1}  # what LLaVA's `patch` drops ([:, 1:] on CLIP)
TOWERS = ("open_clip",) + KINDS


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {kind: build_vision_tower(root / kind, kind) for kind in KINDS}


def picture(width: int = 60, height: int = 40, seed: int = 0) -> Image.Image:
    import numpy as np

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def llava_expand2square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """Reference: LLaVA's llava/mm_utils.py expand2square, written out from its description."""
    w, h = image.size
    if w == h:
        return image
    if w > h:
        out = Image.new(image.mode, (w, w), colour)
        out.paste(image, (0, (w - h) // 2))
    else:
        out = Image.new(image.mode, (h, h), colour)
        out.paste(image, ((h - w) // 2, 0))
    return out


def reference(folder, image, layer: int, keep: bool, kind: str, pad: bool = False) -> tuple[torch.Tensor, ...]:
    """transformers' own pipeline: AutoImageProcessor pixels -> model(output_hidden_states) -> hidden_states[layer],
    class token dropped as LLaVA's `patch` does; and pooler_output."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(str(folder), backend="pil")  # the PIL processor LLaVA used
    model = AutoModel.from_pretrained(str(folder)).eval()
    if pad:
        image = llava_expand2square(image, tuple(int(x * 255) for x in proc.image_mean))
    pixels = proc(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    feats = out.hidden_states[layer]
    return (feats if keep else feats[:, CLASS_TOKENS[kind]:]), out.pooler_output, pixels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer, keep", [(-2, False), (-1, True), (0, False)])
def test_features_equal_the_models_hidden_states(towers, kind, layer, keep):
    enc = build_encoder(EncoderConfig(**tiny_tower_encoder(towers[kind], layer=layer, keep_cls=keep))).eval()
    image = picture()
    hidden = layer if layer < 0 else layer + 1  # block `layer` = hidden_states[layer + 1] (0 = the embeddings)
    want, _, pixels = reference(towers[kind], image, hidden, keep, kind)
    got_pixels = enc.preprocess(image)[None]
    assert torch.equal(got_pixels, pixels)
    assert torch.equal(enc(got_pixels), want)
    assert enc.output_shape() == tuple(want.shape[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_pooled_and_pad_to_square(towers, kind):
    image = picture(30, 50)
    enc = build_encoder(EncoderConfig(**tiny_tower_encoder(towers[kind], features="pooled"))).eval()
    _, pooled, pixels = reference(towers[kind], image, -1, True, kind)
    assert torch.equal(enc(enc.preprocess(image)[None]), pooled[:, None])
    padded = build_encoder(EncoderConfig(**tiny_tower_encoder(towers[kind], image_aspect_ratio="pad"))).eval()
    want, _, pad_pixels = reference(towers[kind], image, -2, False, kind, pad=True)
    assert torch.equal(padded.preprocess(image)[None], pad_pixels) and not torch.equal(pad_pixels, pixels)
    assert torch.equal(padded(pad_pixels), want)
    assert repr(padded.preprocess) != repr(enc.preprocess)  # the processor's fingerprint tells them apart


def test_only_the_blocks_up_to_the_selected_layer_run(towers):
    enc = build_encoder(EncoderConfig(**tiny_tower_encoder(towers["clip"], layer=-2))).eval()
    ran = []
    for i, block in enumerate(enc._blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    enc(torch.zeros(1, 3, 32, 32))
    assert ran == [0, 1]  # of three blocks: the last one is skipped


def test_config_rules():
    assert tuple(BACKENDS) == ("open_clip", "open_clip_file", "transformers")
    with pytest.raises(ConfigError, match="encoder.backend"):
        EncoderConfig(backend="timm")
    with pytest.raises(ConfigError, match="encoder.pretrained is an open_clip setting"):
        EncoderConfig(backend="transformers", name="x", pretrained="openai")
    with pytest.raises(ConfigError, match="encoder.image_aspect_ratio"):
        EncoderConfig(image_aspect_ratio="anyres")


def test_a_missing_processor_file_is_named(towers, tmp_path):
    from prefixvqa.decoder import check_available
    from prefixvqa.vision import ModelNotAvailableError

    import shutil

    folder = shutil.copytree(towers["siglip"], tmp_path / "siglip")
    (folder / "preprocessor_config.json").unlink()
    cfg = AdapterConfig().replace(encoder=tiny_tower_encoder(folder), mapper={"kind": "linear"})
    with pytest.raises(ModelNotAvailableError, match="preprocessor_config.json"):
        check_available(cfg, decoder=False)


# --- every path, for every backend -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(towers, tiny_decoders):
    from prefixvqa.model import MedVQAAdapter

    out = {}
    for name in TOWERS:
        over = tiny_overrides(tiny_decoders["gpt2"])
        over["encoder"] = dict(TINY_ENCODER, features="patches") if name == "open_clip" else \
            tiny_tower_encoder(towers[name])
        over["mapper"] = {"kind": "mlp2x_gelu"}
        out[name] = MedVQAAdapter(AdapterConfig().replace(**over)).eval()
    return out


def test_cache_keys_differ_by_tower(adapters, tmp_path):
    from prefixvqa.data.cache import FeatureCache, cache_features

    records = colour_records(3)
    namespaces = set()
    for name, model in adapters.items():
        stats = cache_features(model, records, tmp_path / "cf", batch_size=2)
        assert stats["cached"] == 3, name
        cache = FeatureCache.for_model(model, tmp_path / "cf")
        namespaces.add(cache.namespace)
        stored = torch.tensor(cache.get(cache.key(records[0])))
        assert torch.allclose(stored, model.encode_images([records[0].image])[0], atol=1e-6), name
    assert len(namespaces) == len(adapters)


@pytest.mark.slow  # ~5 s per tower on a shared 2-core machine
@pytest.mark.parametrize("name", TOWERS)
def test_retrieval_grounding_and_answers(adapters, name, tmp_path):
    from prefixvqa.explain import grounding_map
    from prefixvqa.fewshot import ShotRetriever

    model = adapters[name]
    pool = colour_records(6)
    shots = ShotRetriever(model, pool, cache_dir=tmp_path / "cache").retrieve(pool, 2)
    assert all(len(s) == 2 and q.id not in {r.id for r in s} for q, s in zip(pool, shots))
    for method in ("grad_x_input", "occlusion"):
        g = grounding_map(model, pool[0].image, pool[0].question, "red", method=method, grid=2)
        assert g.heatmap.shape == ((4, 4) if method == "grad_x_input" else (2, 2))
        assert float(g.heatmap.max()) <= 1.0


@pytest.mark.parametrize("name", KINDS)
def test_save_load_hub_and_export_round_trip(adapters, name, tmp_path):
    from prefixvqa.export import export_merged
    from prefixvqa.model import MedVQAAdapter

    model = adapters[name]
    records = colour_records(2)
    images, questions = [r.image for r in records], [r.question for r in records]
    want = [a.text for a in model.answer(images, questions, max_new_tokens=4)]
    model.save_pretrained(tmp_path / "adapter")
    loaded = MedVQAAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.encoder == model.config.encoder
    assert [a.text for a in loaded.answer(images, questions, max_new_tokens=4)] == want
    from prefixvqa.hub import Hub

    hub = Hub(tmp_path / "hub")
    ref = hub.push(tmp_path / "adapter", name="tower")
    (row,) = hub.list()
    assert row["available"] and row["encoder"] == str(model.config.encoder.name)
    pulled = MedVQAAdapter.from_pretrained(hub.pull(ref, tmp_path / "pulled"))
    assert [a.text for a in pulled.answer(images, questions, max_new_tokens=4)] == want
    folder, _ = export_merged(loaded, tmp_path / "export")
    merged = MedVQAAdapter.from_pretrained(folder)
    assert [a.text for a in merged.answer(images, questions, max_new_tokens=4)] == want


@pytest.mark.parametrize("name", KINDS)
def test_fit_check_counts_the_tower(adapters, name):
    from prefixvqa.fitcheck import Architecture, StepPlan, decoder_architecture, encoder_architecture, predict
    from prefixvqa.fitcheck_build import measured_weight_bytes

    model = adapters[name]
    cfg = model.config
    report = predict(StepPlan(cfg, ["mapper", "lora"], 2, 16),
                     Architecture(decoder_architecture(cfg)[0], encoder_architecture(cfg)[0]))
    assert report.weights["encoder"] == measured_weight_bytes(model.encoder.visual)
    assert report.weights["mapper"] == measured_weight_bytes(model.mapper)


def test_dicom_and_nifti_inputs_reach_the_tower(adapters, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    import numpy as np

    from prefixvqa.data.records import VQARecord

    volume = (np.arange(24 * 20 * 3).reshape(24, 20, 3) % 251).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(path))
    model = adapters["siglip"]
    rec = VQARecord("n0", str(path), "Is there a lesion?", "no", "closed", None, {"slice_index": 1})
    item = model.processor.encode_record(rec)
    assert "error" not in item and item["pixel_values"].shape == (3, 32, 32)
    feats = model.encode_pixels(item["pixel_values"][None])
    assert feats.shape == (1, 16, 32)
    from test_images import synthetic_dicom

    dcm = tmp_path / "scan.dcm"  # a DICOM file, windowed by the record's meta, through the same tower
    dcm.write_bytes(synthetic_dicom((np.arange(48 * 40).reshape(48, 40) * 7 % 4096).astype(np.uint16)))
    item = model.processor.encode_record(VQARecord("d0", str(dcm), "Is there a lesion?", "no", "closed", None,
                                                   {"window": [600, 800]}))
    assert "error" not in item and item["pixel_values"].shape == (3, 32, 32)
    assert model.encode_pixels(item["pixel_values"][None]).shape == (1, 16, 32)
