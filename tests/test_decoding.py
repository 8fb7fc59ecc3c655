"""The greedy loop's steppers: the preallocated-cache step computes what transformers' forward computes, bit for bit,
and rows that finish early leave the batch without changing any answer."""

from __future__ import annotations

import pytest

from prefixvqa import MedVQAAdapter, decoding
from prefixvqa.generation import finish
from tests.test_core import IMAGES, QUESTIONS, make_config


def _greedy(model, images, questions, stop, new_tokens=6):
    batch = model.processor(images, questions, padding_side="left")
    return [(a.text, a.score, a.num_tokens) for a in model.generate(**batch, max_new_tokens=new_tokens, stop=stop)]


def _spy(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def spy(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("mode", ["lora", "frozen", "dora", "prompt_tuning", "prefix_tuning"])
def test_cached_step_equals_transformers_forward(tiny_decoders, monkeypatch, mode):
    """Padded rows, one image asked several questions (shared head) and soft prompts: the same ids and the same
    log-probabilities whichever stepper runs."""
    model = MedVQAAdapter(make_config(tiny_decoders["llama"], mode=mode)).eval()
    cases = [(IMAGES, QUESTIONS), ([IMAGES[0]] * 3, QUESTIONS + ["which organ is shown in the upper part?"])]
    steps = _spy(monkeypatch, decoding.CachedStep, "step")
    cached = [_greedy(model, ims, qs, []) for ims, qs in cases]
    assert steps, "the cached stepper did not run"
    monkeypatch.setattr(decoding, "CACHED_STEP_TYPES", frozenset())
    steps.clear()
    reference = [_greedy(model, ims, qs, []) for ims, qs in cases]
    assert not steps
    assert cached == reference


def test_eager_attention_cached_step_equals_transformers_forward(tiny_decoders, monkeypatch):
    model = MedVQAAdapter(make_config(tiny_decoders["llama"])).eval()
    model.decoder.get_base_model().config._attn_implementation = "eager"
    cached = _greedy(model, IMAGES, QUESTIONS, [])
    monkeypatch.setattr(decoding, "CACHED_STEP_TYPES", frozenset())
    assert cached == _greedy(model, IMAGES, QUESTIONS, [])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_that_stop_leave_the_batch_and_answers_do_not_change(tiny_decoders, monkeypatch, family):
    """A stop string that one row completes early: that row leaves the batch (`keep`), and every answer equals the
    one cut from the full-length generation, as before rows could leave."""
    model = MedVQAAdapter(make_config(tiny_decoders[family])).eval()
    images, questions = IMAGES * 2, QUESTIONS * 2
    batch = model.processor(images, questions, padding_side="left")
    full = model.generate(**batch, max_new_tokens=6, stop=[])
    assert all(a.num_tokens == 6 for a in full)
    # a stop string a row completes with its second token (a plain-text token: the stop criterion reads token text)
    from prefixvqa import generation

    captured = {}
    original = generation.greedy

    def capture(*args, **kwargs):
        captured["out"] = original(*args, **kwargs)
        return captured["out"]

    monkeypatch.setattr(generation, "greedy", capture)
    model.generate(**batch, max_new_tokens=6, stop=[])
    ids, lps = captured["out"]
    tok = model.tokenizer
    whole = [tok.decode(row) for row in ids]
    stop = next(t for k in range(1, 5) for row in ids for t in [tok.decode(row[k:k + 1]).strip()]
                if t.isascii() and t.isprintable() and len(t) > 1 and not all(t in w for w in whole))
    kept = _spy(monkeypatch, decoding.CachedStep if family == "llama" else decoding.TransformersStep, "keep")
    got = model.generate(**batch, max_new_tokens=6, stop=[stop])
    expected = [finish(model, row, lp, [stop]) for row, lp in zip(ids.tolist(), lps.tolist())]
    assert kept, "no row left the batch"
    assert [(a.text, a.num_tokens) for a in got] == [(a.text, a.num_tokens) for a in expected]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(got, expected))
    assert any(a.num_tokens < 6 for a in got)
