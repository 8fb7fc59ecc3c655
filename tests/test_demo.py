"""`prefixvqa demo`: its data (real pydicom-data DICOM + generated lesions) and one end-to-end run on tiny models."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("data_store") is None,
                                reason="pip install --no-deps pydicom-data")

from prefixvqa.demo import build_demo_data, run_demo  # noqa: E402
from prefixvqa.testing import tiny_overrides  # noqa: E402


def test_demo_data_mixes_real_dicom_modalities_and_lesions():
    train, test = build_demo_data(12, 9, views=3)
    kinds = {r.meta["question_type"] for r in test}
    assert kinds == {"presence", "side", "count", "modality"}
    modality = [r for r in train + test if r.meta["question_type"] == "modality"]
    assert len({r.answer for r in modality}) >= 4  # several real modalities (CT, MR, US, x-ray, ...)
    assert all(r.answer in r.choices for r in modality)
    assert not {r.id for r in train} & {r.id for r in test}
    # held-out DICOM items are unseen crops of files that also have training crops
    assert {r.meta["source"] for r in test if r.meta["question_type"] == "modality"} <= \
        {r.meta["source"] for r in train if r.meta["question_type"] == "modality"}
    lesion_images = {r.image for r in train if r.meta["dataset"] == "synthetic_lesions"}
    assert not lesion_images & {r.image for r in test}


@pytest.mark.slow
def test_demo_runs_end_to_end_on_tiny_models(tmp_path, tiny_decoders, capsys):
    out = run_demo(tmp_path / "demo", n_train=6, n_test=6, epochs=1, views=2, progress=False,
                   overrides=tiny_overrides(tiny_decoders["llama"]))
    printed = capsys.readouterr().out
    assert "held-out accuracy by question type" in printed and "sample answers" in printed
    assert set(out["by_type"]) == set(out["control"]) == {"all", "presence", "side", "count", "modality"}
    assert all(0.0 <= v <= 1.0 for v in out["by_type"].values())
    adapter = tmp_path / "demo" / "adapter"
    assert (adapter / "mapper.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "eval" / "report.md").is_file()
    rows = [json.loads(line) for line in (tmp_path / "demo" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 + sum(r["meta"]["question_type"] == "modality" for r in rows) and len(rows) > 6
