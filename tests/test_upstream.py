"""Upstream metric variants (issue #17): each equals its source code's value, worked out by hand from the upstream
rules (LLaVA-Med v1.0.0, LLaVA-Rad, van Sonsbeek et al., bert_score), and every protocol's metric names its source."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from prefixvqa.data.records import VQARecord
from prefixvqa.eval import protocols as P
from prefixvqa.eval import upstream as U
from prefixvqa.eval.metrics import closed_match, open_recall
from prefixvqa.eval.sources import METRIC_SOURCES, metric_sources, protocols_table

ROOT = Path(__file__).resolve().parent.parent


def _closed(gold, pred):
    return VQARecord("c", None, "is it?", gold, "closed")


# ------------------------------------------------------------------------------------------------------ LLaVA-Med
@pytest.mark.parametrize("gold, pred", [("left", "left"), ("Axial", "axial."), ("2", "two"), ("no", "none"),
                                        ("male", "female")])
def test_llava_med_closed_minimal_cases(gold, pred):
    """The issue's cases: upstream 0 (no "yes"/"no" in the answer, or "none" -> "0"); prefixvqa's substring rule 1."""
    assert U.llava_med_closed(pred, gold) == 0.0
    assert closed_match(pred, gold, "substring") == 1.0
    assert P.ITEM_FUNCS["closed_accuracy_llava_med"](_closed(gold, pred), {"prediction": pred}) == 0.0


def test_llava_med_closed_rule():
    assert U.llava_med_closed("normal", "no") == 1.0  # character containment, as upstream
    assert U.llava_med_closed("Yes, there is.", "yes") == 1.0
    assert U.llava_med_closed("no", "yes") == 0.0
    assert U.llava_med_closed("there is no left lesion", "left") == 1.0  # "no" present and "left" contained


@pytest.mark.parametrize("gold, pred, upstream, ours", [
    ("left lung", "lung lung lung", 0.75, 0.5),  # tp counts the prediction's 3 "lung"s, fn the missing "left"
    ("MRI", "M.R.I.", 1.0, 0.0),  # periods deleted upstream, turned into spaces here
    ("Crohn's disease", "crohns disease", 0.5, 1.0),  # upstream keeps the apostrophe
    ("two", "2 lesions", 1.0, 1.0),
    ("the liver", "", 0.0, 0.0),
])
def test_llava_med_open_recall_minimal_cases(gold, pred, upstream, ours):
    assert U.llava_med_open_recall(pred, gold) == upstream
    assert open_recall(pred, gold) == ours


@pytest.mark.parametrize("text, expected", [
    ("The left-lung (x, y).", "left lung x y"),  # "-" -> space; "(" and "," next to a space -> deleted; "." deleted
    ("Two, or three dont.", "2 or 3 don't"),  # number words up to ten, contractions regain their apostrophe
    ("None", "0"), ("1,000 mm", "1000 mm"), ("2.5 cm.", "2.5 cm"), ("a:b", "a:b"),
    ("a." * 40, "a" * 33 + ".a" * 7 + "."),  # re.UNICODE (32) passed as sub's count: only 32 periods go
])
def test_llava_med_normalize(text, expected):
    assert U.llava_med_normalize(text) == expected


def test_llava_med_protocol_and_the_pre35_denominator():
    golds, preds = ["yes", "no", "yes", "left"], ["no", "no", "maybe", "left"]
    records = [VQARecord(str(i), None, "q?", g, "closed") for i, g in enumerate(golds)]
    rows = [{"id": str(i), "prediction": p} for i, p in enumerate(preds)]
    metrics = P.compute_metrics(P.get_protocol("llava_med", upstream_metrics=True), records, rows)
    assert metrics["closed_accuracy_llava_med"] == pytest.approx(1 / 4)  # v1.0.0: every item counts
    # before #35: "no" for gold "yes" has a yes/no word but misses the gold -> left out of the denominator
    assert metrics["closed_accuracy_llava_med_pre35"] == pytest.approx(1 / 3)
    assert metrics["n_closed_accuracy_llava_med_pre35"] == 3
    assert metrics["closed_accuracy_strict"] == pytest.approx(2 / 4)
    assert "closed_accuracy_llava_med_pre35" not in P.compute_metrics("llava_med", records, rows)


# ------------------------------------------------------------------------------------------------------ LLaVA-Rad
def test_llava_rad_bleu_scores_case_and_punctuation():
    pred, ref = ["NO ACUTE CARDIOPULMONARY ABNORMALITY."], ["No acute cardiopulmonary abnormality."]
    # 13a tokens: 5 on each side, only "." matches; exp smoothing: zero orders k=2,3,4 get 1/(2^j * total_k)
    b1, low1, high1 = U.llava_rad_bleu(pred, ref, n=1)
    assert b1 == pytest.approx(1 / 5, abs=1e-12) and low1 == pytest.approx(b1) and high1 == pytest.approx(b1)
    b4, _, _ = U.llava_rad_bleu(pred, ref, n=4)
    assert b4 == pytest.approx((1 / 5 * 1 / 8 * 1 / 12 * 1 / 16) ** 0.25, abs=1e-12)
    assert round(b1, 3) == 0.2 and round(b4, 3) == 0.107
    metrics = P.compute_metrics("report", [VQARecord("r", None, "findings?", ref[0], "open")],
                                [{"prediction": pred[0]}])
    assert metrics["bleu1"] == metrics["bleu4"] == 1.0  # prefixvqa's corrected BLEU: lower-cased words
    assert metrics["bleu4_llava_rad"] == b4


def test_llava_rad_rouge_l_equals_rouge_scores_seeded_aggregator():
    scoring = pytest.importorskip("rouge_score.scoring")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    refs = ["no acute cardiopulmonary process", "heart size is normal", "small left pleural effusion",
            "clear lungs", "Stable  cardiomegaly.", "no pneumothorax"]
    preds = ["no acute process", "heart size normal", "left effusion", "lungs are clear", "cardiomegaly", "x"]
    state = np.random.get_state()
    np.random.seed(U.LLAVA_RAD_NUMPY_SEED)  # what LLaVA-Rad's run.py does at import
    aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=500)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for ref, pred in zip(refs, preds):
        aggregator.add_scores(scorer.score(ref, pred))
    expected = aggregator.aggregate()["rougeL"]
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    assert U.llava_rad_rouge_l(preds, refs) == (expected.mid.fmeasure, expected.low.fmeasure, expected.high.fmeasure)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global numpy stream is untouched
    one = U.llava_rad_rouge_l(["heart size normal"], ["heart size is normal"])  # LCS 3: P 1, R 3/4 -> F 6/7
    assert one == pytest.approx((6 / 7,) * 3)


# ------------------------------------------------------------------------------------------- van Sonsbeek et al.
def _bpe_tokenizer(folder: Path) -> str:
    """A byte-level BPE tokenizer with a handful of merges, saved as a local folder (offline stand-in for gpt2)."""
    from transformers import GPT2TokenizerFast

    pieces = ["l", "e", "f", "t", "u", "n", "g", "Ġ", "le", "ft", "left", "un", "ung", "Ġl", "Ġlung", "<|endoftext|>"]
    merges = [("l", "e"), ("f", "t"), ("le", "ft"), ("u", "n"), ("un", "g"), ("Ġ", "l"), ("Ġl", "ung")]
    GPT2TokenizerFast(vocab={p: i for i, p in enumerate(pieces)}, merges=merges).save_pretrained(folder / "tok")
    return str(folder / "tok")


def test_gpt2_token_f1_counts_the_set_tokenizers_ids(tmp_path):
    tok = _bpe_tokenizer(tmp_path)
    # "left lung" -> [left, Ġlung]; "lung" -> [l, ung]; "left" -> [left]
    assert U.load_f1_tokenizer(tok).encode("left lung") == [10, 14]
    assert U.gpt2_token_f1(["lung", "left", "left lung", ""], ["left lung"] * 3 + [""], tok) == [0.0, 2 / 3, 1.0, 1.0]
    records = [VQARecord("a", None, "which?", "left lung", "open")]
    protocol = P.get_protocol("prefix_vqa", upstream_metrics=True, f1_tokenizer=tok)
    rows = P.item_scores(P.get_protocol(protocol, item_metrics=(), upstream_metrics=("token_f1_upstream",),
                                        primary="exact_match"), records, [{"prediction": "lung"}])
    assert rows[0]["token_f1_upstream"] == 0.0 and P.ITEM_FUNCS["token_f1"](records[0], {"prediction": "lung"}) == 2 / 3
    assert metric_sources(protocol)["token_f1_upstream"]["settings"] == {"f1_tokenizer": tok}


# ------------------------------------------------------------------------------------------------------ BERTScore
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 9-layer BERT saved in a folder named bert-base-uncased (so bert_score's default layer applies)."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert") / "bert-base-uncased"
    folder.mkdir()
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] no acute lung left right effusion heart is normal . ##s".split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=9, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=1)
def _loaded(folder):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def _by_hand(folder, pred, ref, layer):
    """bert_score's greedy matching written out in float64: every token a candidate, [CLS]/[SEP] weighted 0."""
    import torch

    tok, model = _loaded(str(folder))

    def vecs(text):
        ids = tok(text.strip())["input_ids"]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].double()
        h = (h / h.norm(dim=-1, keepdim=True)).numpy()
        return h, np.array([i not in (tok.cls_token_id, tok.sep_token_id) for i in ids], dtype=float)

    (h, hw), (r, rw) = vecs(pred), vecs(ref)
    sim = h @ r.T
    p, rec = (sim.max(1) * hw).sum() / hw.sum(), (sim.max(0) * rw).sum() / rw.sum()
    return p, rec, 2 * p * rec / (p + rec)


def test_bertscore_equals_the_hand_computation(tiny_bert):
    from prefixvqa.eval.bertscore import bertscore, bertscore_layer

    assert bertscore_layer("bert-base-uncased") == 9 and bertscore_layer(str(tiny_bert)) == 9
    assert bertscore_layer("my-encoder", 3) == 3
    with pytest.raises(ValueError, match="no default layer"):
        bertscore_layer("my-encoder")
    preds, refs = ["no acute effusion", "left lung", "heart", "normal"], ["no effusion", "right lung", "heart", ""]
    got = bertscore(preds, refs, str(tiny_bert), device="cpu")
    for i in range(3):
        for key, value in zip(("precision", "recall", "f1"), _by_hand(tiny_bert, preds[i], refs[i], 9)):
            assert got[key][i] == pytest.approx(value, abs=1e-5)
    assert got["f1"][2] == pytest.approx(1.0, abs=1e-6) and got["f1"][3] == 0.0  # identical; empty reference
    other = bertscore(preds[:1], refs[:1], str(tiny_bert), 4, device="cpu")["f1"][0]
    assert other == pytest.approx(_by_hand(tiny_bert, preds[0], refs[0], 4)[2], abs=1e-5)
    protocol = P.get_protocol("prefix_vqa", upstream_metrics=True, bertscore_model=str(tiny_bert))
    rows = P.item_scores(P.get_protocol(protocol, item_metrics=(), upstream_metrics=("bertscore_f1_upstream",),
                                        primary="exact_match"),
                         [VQARecord("a", None, "q", refs[0], "open")], [{"prediction": preds[0]}])
    assert rows[0]["bertscore_f1_upstream"] == pytest.approx(got["f1"][0], abs=1e-6)
    assert metric_sources(protocol)["bertscore_f1_upstream"]["settings"] == {"bertscore_model": str(tiny_bert),
                                                                             "bertscore_layer": None}


# ---------------------------------------------------------------------------------------------- sources registry
@pytest.mark.parametrize("name", P.list_protocols())
def test_every_protocol_metric_names_its_source(name):
    protocol = P.get_protocol(name, upstream_metrics=True)
    for metric in (*protocol.all_item_metrics, *protocol.corpus_metrics):
        src = METRIC_SOURCES.get(metric)
        assert src is not None, f"{name}: metric {metric!r} has no source in eval.sources.METRIC_SOURCES"
        module, _, attr = src.function.rpartition(".")
        doc = getattr(importlib.import_module(module), attr).__doc__ or ""
        assert doc.strip(), f"{src.function} has no docstring"
        if src.upstream:
            commit = src.source.commit.split()[0]
            assert src.source.repository in doc and commit in doc, f"{src.function}'s docstring must name {src}"
        for upstream_name, why in src.corrects.items():
            assert METRIC_SOURCES[upstream_name].upstream and why.strip()
        assert set(src.settings) <= set(protocol.settings())
    assert set(metric_sources(protocol)) == {*protocol.all_item_metrics, *protocol.corpus_metrics}


def test_readme_has_the_protocols_table():
    readme = (ROOT / "README.md").read_text()
    assert protocols_table() in readme, "README's protocol table is stale: paste prefixvqa.eval.sources.protocols_table()"


def test_metrics_json_records_sources(tmp_path):
    from prefixvqa.eval.reports import write_outputs

    records = [VQARecord("a", None, "is it?", "no", "closed"), VQARecord("b", None, "what?", "left lung", "open")]
    preds = [{"id": "a", "prediction": "none", "mode": "generate"}, {"id": "b", "prediction": "lung", "mode": "generate"}]
    manifest = {"dataset": None, "split": None, "num_items": 2, "content_hash": "0" * 16, "adapter": {"path": None}}
    write_outputs(tmp_path, P.get_protocol("llava_med"), records, preds, manifest, plots=False)
    sources = json.loads((tmp_path / "metrics.json").read_text())["sources"]
    assert sources["closed_accuracy_llava_med"]["source"].startswith("microsoft/LLaVA-Med @ b9a98a7 (tag v1.0.0)")
    assert sources["closed_accuracy_llava_med"]["equals_upstream"] is True
    assert sources["closed_accuracy_strict"]["equals_upstream"] is False


def test_cli_metric_model_options():
    from prefixvqa import cli_options as opt
    from prefixvqa.cli import build_parser

    args = build_parser().parse_args(["eval", "--adapter", "a", "--data", "d", "--bert-model", "m", "--bert-layer",
                                      "3", "--f1-tokenizer", "t"])
    assert opt.metric_model_overrides(args) == {"bert_model_path": "m", "bertscore_model": "m", "bert_layer": 3,
                                                "bertscore_layer": 3, "f1_tokenizer": "t"}
    assert opt.metric_model_overrides(build_parser().parse_args(["eval", "--adapter", "a", "--data", "d"])) == {}


def test_every_registered_metric_has_a_source():
    registered = {*P.ITEM_FUNCS, *P.BATCHED_ITEM_METRICS, *P.CORPUS_FUNCS, *P.CORPUS_CI_FUNCS}
    assert registered <= set(METRIC_SOURCES), sorted(registered - set(METRIC_SOURCES))
