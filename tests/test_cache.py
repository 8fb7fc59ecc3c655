"""Feature cache: images are read once, cached features give the same loss, other encoders/transforms miss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixvqa.data import images as images_mod  # noqa: E402
from prefixvqa.data.cache import FeatureCache, cache_features  # noqa: E402
from prefixvqa.train import TrainConfig, train  # noqa: E402
from prefixvqa.data.synthetic import colour_records  # noqa: E402
from prefixvqa.train.recipe import build_model  # noqa: E402

FAST = {"progress": False, "tensorboard": False, "plot": False, "group_by_length": False}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def fresh_model(work: Path):
    torch.manual_seed(0)
    return build_model({"tiny": "gpt2", "config": {"mapper": {"prefix_length": 2}}}, work)


@pytest.fixture
def image_reads(monkeypatch) -> list:
    """Every decode of an image: all of them go through the processor's one image path."""
    reads: list = []
    original = images_mod.load_image

    def spy(ref, *args, **kwargs):
        reads.append(ref)
        return original(ref, *args, **kwargs)

    monkeypatch.setattr(images_mod, "load_image", spy)
    return reads


def test_second_epoch_reads_no_image_and_loss_matches(work, image_reads):
    records, eval_records = colour_records(6), colour_records(2, seed=1)
    cfg = dict(epochs=2, batch_size=3, eval_every_epoch=True, log_every=1, **FAST)
    cached = train(fresh_model(work), records, eval_records,
                   TrainConfig(output_dir=str(work / "cached"), feature_cache=str(work / "features"), **cfg))
    assert len(image_reads) == len(records) + len(eval_records)  # each image decoded once over two epochs
    image_reads.clear()
    plain = train(fresh_model(work), records, eval_records, TrainConfig(output_dir=str(work / "plain"), **cfg))
    # + each training image once more for the adapter's image summary (prefixvqa/ood.py; the cached run reads those
    # features from the cache)
    assert len(image_reads) == 2 * (len(records) + len(eval_records)) + len(records)
    a = [r.get("loss", r.get("value")) for r in cached.history]
    b = [r.get("loss", r.get("value")) for r in plain.history]
    assert len(a) == len(b) == 6 and np.allclose(a, b, atol=1e-6, rtol=0), (a, b)
    image_reads.clear()  # a later run with the same encoder reuses the cache
    train(fresh_model(work), records, eval_records,
          TrainConfig(output_dir=str(work / "again"), feature_cache=str(work / "features"), **cfg))
    assert image_reads == []


def test_encoder_or_preprocessing_change_invalidates(work):
    records = colour_records(3)
    model = fresh_model(work)
    stats = cache_features(model, records, work / "cf", batch_size=2)
    assert stats["images"] == 3 and stats["cached"] == 3 and stats["failed"] == []
    assert cache_features(model, records, work / "cf", batch_size=2)["reused"] == 3
    enc, pre = model.base_fingerprints["encoder"], model.processor.transform_fingerprint()
    same = FeatureCache(work / "cf", enc, pre)
    key = same.key(records[0])
    assert same.get(key) is not None and same.get(key).shape == (1, 32)
    assert FeatureCache(work / "cf", enc, pre + "x").get(key) is None
    assert FeatureCache(work / "cf", "other-encoder", pre).get(key) is None
    rebuilt = fresh_model(work)  # the same encoder rebuilt later: same namespace, entries reused
    assert FeatureCache.for_model(rebuilt, work / "cf").namespace == same.namespace


def test_view_arguments_and_bad_images(work):
    records = colour_records(2)
    cache = FeatureCache(work / "views", "e", "p")
    plain = cache.key(records[0])
    records[0].meta["frame"] = 0
    assert cache.key(records[0]) != plain
    records[1].image = str(work / "nope.png")
    stats = cache_features(fresh_model(work), records, work / "views2")
    assert stats["images"] == 1 and len(stats["failed"]) == 1 and "nope.png" in stats["failed"][0]
