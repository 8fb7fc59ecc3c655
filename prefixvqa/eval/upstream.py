"""Metrics exactly as the papers' own evaluation code computes them, each under its own name.

prefixvqa's corrected metrics (:mod:`prefixvqa.eval.metrics`) differ from what the papers ran; a number placed in a
published table must come from the code that made the table. This module re-implements those rules (written from a
reading of the code, not copied) and names, in every docstring, the repository, commit and file it reproduces:

* LLaVA-Med, microsoft/LLaVA-Med @ b9a98a7 (tag v1.0.0): :func:`llava_med_normalize`, :func:`llava_med_closed`,
  :func:`llava_med_open_recall`; before the fix of issue #35 (e9972cf): :func:`llava_med_closed_pre35`.
* LLaVA-Rad, microsoft/LLaVA-Rad @ 1fc4409, ``llava/eval/rrg_eval/run.py``: :func:`llava_rad_bleu`,
  :func:`llava_rad_rouge_l`.
* van Sonsbeek et al., tjvsonsbeek/open-ended-medical-vqa @ c605aeb, ``predict.py``: :func:`gpt2_token_f1` (F1 on
  GPT-2 token ids, whatever the decoder); their BERTScore is :func:`prefixvqa.eval.bertscore.bertscore`.

All values are in [0, 1] (sacrebleu's x100 divided by 100) and never rounded here.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from .errors import EvaluationError

__all__ = ["llava_med_normalize", "llava_med_closed", "llava_med_closed_pre35", "llava_med_open_recall",
           "llava_rad_bleu", "llava_rad_rouge_l", "LLAVA_RAD_BOOTSTRAP", "LLAVA_RAD_NUMPY_SEED", "gpt2_token_f1",
           "load_f1_tokenizer"]

# --------------------------------------------------------------------------------------------------------------------
# LLaVA-Med v1.0.0: llava/eval/eval_metrics/glossary.py normalize_word, llava/eval/run_eval.py
# --------------------------------------------------------------------------------------------------------------------

#: characters normalize_word removes (next to a space, or anywhere when the text has a digit,comma,digit) or turns
#: into a space (otherwise); note that "'", ":" and "." are not among them ("." has its own rule)
_LM_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')
_LM_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
#: a period not followed by a digit; upstream passes re.UNICODE (== 32) where `sub` takes its count, so at most 32
#: periods go per call
_LM_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_LM_PERIOD_COUNT = int(re.UNICODE)
_LM_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                       "0 0 1 2 3 4 5 6 7 8 9 10".split()))
_LM_ARTICLES = frozenset({"a", "an", "the"})
#: the contracted forms of the glossary (the VQA evaluation's list); a key is the form with one apostrophe left out
_LM_CONTRACTED = (
    "ain't aren't can't couldn't could've couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()


def _contractions() -> dict[str, str]:
    """The glossary's contraction table: every contracted form, keyed by each spelling with one apostrophe dropped;
    plus its three odd entries ("let's" and "she's" map to themselves, "somebody'd" loses its apostrophe)."""
    table: dict[str, str] = {}
    for form in _LM_CONTRACTED:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1:]] = form
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
    return table


_LM_CONTRACTIONS = _contractions()


def llava_med_normalize(text: str) -> str:
    """LLaVA-Med's ``normalize_word`` (microsoft/LLaVA-Med @ b9a98a7, tag v1.0.0,
    ``llava/eval/eval_metrics/glossary.py``), rule for rule.

    1. For each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if the *input* has it next to a space, or has a
       digit-comma-digit anywhere, the character is deleted, else replaced by a space.
    2. Periods not followed by a digit are deleted, at most 32 of them (upstream passes ``re.UNICODE`` as the count).
    3. Lower-case, split on whitespace; "none"/"zero" -> "0", "one".."ten" -> digits; "a", "an", "the" dropped;
       contractions without their apostrophe get it back ("dont" -> "don't").
    4. Joined by spaces, and any comma left is deleted.

    Apostrophes stay ("crohn's" differs from "crohns"); colons, "%", "*" and non-ASCII punctuation stay.
    """
    out = text
    for ch in _LM_PUNCT:
        glued = (ch + " " in text or " " + ch in text) or _LM_COMMA_NUMBER.search(text) is not None
        out = out.replace(ch, "" if glued else " ")
    out = _LM_PERIOD.sub("", out, _LM_PERIOD_COUNT)
    words = [_LM_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_LM_CONTRACTIONS.get(w, w) for w in words if w not in _LM_ARTICLES]
    return " ".join(words).replace(",", "")


def _lm_answer(text: str) -> str:
    """How ``run_eval.py`` prepares an answer: lower-cased, then normalised."""
    return llava_med_normalize(str(text).lower())


def llava_med_closed(pred: str, gold: str) -> float:
    """LLaVA-Med v1.0.0 closed ("yes/no") accuracy of one item: microsoft/LLaVA-Med @ b9a98a7 (tag v1.0.0),
    ``llava/eval/run_eval.py`` ``evaluate``.

    On lower-cased, normalised strings (:func:`llava_med_normalize`): 1.0 iff the prediction contains "yes" or "no"
    as a substring *and* contains the gold as a substring, else 0.0; every closed item counts. So gold "left" and
    prediction "left" score 0 (no yes/no in it), gold "no" and prediction "none" score 0 ("none" becomes "0"), and
    gold "no" and prediction "normal" score 1.
    """
    p, g = _lm_answer(pred), _lm_answer(gold)
    return float(("yes" in p or "no" in p) and g in p)


def llava_med_closed_pre35(pred: str, gold: str) -> float | None:
    """LLaVA-Med's closed accuracy before the fix of its issue #35: microsoft/LLaVA-Med @ e9972cf,
    ``llava/eval/run_eval.py`` (also ``llava/eval/run_eval_pvqa.py`` at b9a98a7, tag v1.0.0).

    As :func:`llava_med_closed`, except that an item whose prediction contains "yes" or "no" but not the gold is
    *dropped from the denominator* (None here): the mean over the remaining items is what that script printed.
    """
    p, g = _lm_answer(pred), _lm_answer(gold)
    if "yes" in p or "no" in p:
        return 1.0 if g in p else None
    return 0.0


def llava_med_open_recall(pred: str, gold: str) -> float:
    """LLaVA-Med v1.0.0 open-question recall of one item: microsoft/LLaVA-Med @ b9a98a7 (tag v1.0.0),
    ``llava/eval/run_eval.py`` (the "recall" row) via ``calculate_f1score`` in
    ``llava/eval/eval_metrics/evaluate_metrics.py``.

    Both answers are lower-cased and normalised twice (once by ``run_eval.py``, once by ``calculate_f1score``),
    then split on whitespace. ``tp`` = occurrences *in the prediction* of words the gold has, ``fn`` = occurrences
    in the gold of words the prediction lacks; recall = ``tp / (tp + fn)``, 0.0 when either side is empty or
    ``tp`` is 0. Gold "left lung", prediction "lung lung lung": tp 3, fn 1, recall 0.75.
    """
    p = Counter(llava_med_normalize(_lm_answer(pred)).split())
    g = Counter(llava_med_normalize(_lm_answer(gold)).split())
    if not p or not g:
        return 0.0
    tp = sum(n for w, n in p.items() if w in g)
    fn = sum(n for w, n in g.items() if w not in p)
    return tp / (tp + fn) if tp else 0.0


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-Rad: llava/eval/rrg_eval/run.py and llava/eval/rrg_eval/rrg_eval/rouge.py
# --------------------------------------------------------------------------------------------------------------------

LLAVA_RAD_BOOTSTRAP = 500  # n_bootstrap of its BLEU, n_samples of its ROUGE aggregator
LLAVA_RAD_NUMPY_SEED = 3  # run.py: np.random.seed(3) at import; rouge-score's aggregator draws from that stream


def _check(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise EvaluationError(f"got {len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise EvaluationError("no items to score")


def llava_rad_bleu(preds: Sequence[str], refs: Sequence[str], n: int = 4) -> tuple[float, float, float]:
    """LLaVA-Rad's BLEU-1 (``n=1``) or BLEU-4 (``n=4``) with its interval: microsoft/LLaVA-Rad @ 1fc4409,
    ``llava/eval/rrg_eval/run.py`` ``bleu1``/``bleu4`` with ``bootstrap_ci=True`` (the default of its ``main``).

    sacrebleu's ``BLEU(max_ngram_order=n).corpus_score(preds, [refs], n_bootstrap=500)`` with its defaults: 13a
    tokeniser, cased, punctuation kept, exponential smoothing, no effective order. Returns ``(score, low, high)``
    /100: the score on the whole corpus (upstream's "median" key holds it), and sacrebleu's bootstrap ``mean -/+ ci``
    (``ci`` = half the spread between the 2.5% and 97.5% resample scores; its resampling RNG is
    ``numpy.random.default_rng(SACREBLEU_SEED)``, 12345 unless that environment variable says otherwise).
    """
    _check(preds, refs)
    from .metrics import _require

    bleu = _require("sacrebleu.metrics", "sacrebleu").BLEU(max_ngram_order=n)
    ret = bleu.corpus_score(hypotheses=list(preds), references=[list(refs)], n_bootstrap=LLAVA_RAD_BOOTSTRAP)
    return ret.score / 100, (ret._mean - ret._ci) / 100, (ret._mean + ret._ci) / 100


@functools.lru_cache(maxsize=1)
def _default_rouge_scorer() -> Any:
    from .metrics import _require

    return _require("rouge_score.rouge_scorer", "rouge-score").RougeScorer(["rougeL"], use_stemmer=False)


def llava_rad_rouge_l(preds: Sequence[str], refs: Sequence[str], *, seed: int = LLAVA_RAD_NUMPY_SEED,
                      n_samples: int = LLAVA_RAD_BOOTSTRAP) -> tuple[float, float, float]:
    """LLaVA-Rad's ROUGE-L with its interval: microsoft/LLaVA-Rad @ 1fc4409, ``llava/eval/rrg_eval/run.py``
    ``rougel`` with ``bootstrap_ci=True`` -> ``llava/eval/rrg_eval/rrg_eval/rouge.py`` ``compute``.

    Per item rouge-score's ``RougeScorer(["rougeL"], use_stemmer=False)`` (its own tokeniser) gives precision,
    recall and F; rouge-score's ``BootstrapAggregator(confidence_interval=0.95, n_samples=500)`` then draws
    ``np.random.choice(n, size=n)`` 500 times, averages the (P, R, F) rows of each resample, and reports the
    2.5th/50th/97.5th percentiles of those means. Returns F's ``(median, low, high)``, as upstream reports them.

    The draws come from numpy's global stream, which ``run.py`` seeds with 3 at import; here a private
    ``RandomState(seed)`` gives the same draws without touching the caller's global state. Equal to upstream when
    nothing else drew from numpy's global stream before ROUGE-L in that run (its CheXbert and RadGraph bootstraps use
    scipy with ``random_state=3`` and Python's ``random``, not that stream).
    """
    _check(preds, refs)
    scorer = _default_rouge_scorer()
    matrix = np.array([tuple(scorer.score(r, p)["rougeL"]) for p, r in zip(preds, refs)], dtype=np.float64)
    rng = np.random.RandomState(seed)
    means = np.zeros((n_samples, matrix.shape[1]))
    for i in range(n_samples):
        means[i, :] = np.mean(matrix[rng.choice(np.arange(matrix.shape[0]), size=matrix.shape[0]), :], axis=0)
    delta = (1 - 0.95) / 2
    low, mid, high = np.percentile(means, 100 * np.array([delta, 0.5, 1 - delta]), axis=0)[:, 2]
    return float(mid), float(low), float(high)


# --------------------------------------------------------------------------------------------------------------------
# van Sonsbeek et al.: predict.py compute_f1 on GPT-2 token ids
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_f1_tokenizer(name: str) -> Any:
    """The tokenizer :func:`gpt2_token_f1` counts with: a hub id ("gpt2", as upstream) or a local tokenizer folder."""
    from .metrics import _require

    return _require("transformers").AutoTokenizer.from_pretrained(name)


def gpt2_token_f1(preds: Sequence[str], golds: Sequence[str], tokenizer: str = "gpt2") -> list[float]:
    """van Sonsbeek et al.'s F1 per item: tjvsonsbeek/open-ended-medical-vqa @ c605aeb, ``predict.py``
    ``compute_f1(tokenizer.encode(gold), tokenizer.encode(prediction))`` with
    ``tokenizer = GPT2Tokenizer.from_pretrained('gpt2')``, whatever the decoder.

    SQuAD-style F1 on the two id lists as multisets (1.0 if both are empty, 0.0 if one is); the texts are not
    normalised. ``tokenizer`` names the tokenizer (default the "gpt2" hub id; a local folder works offline).
    """
    from .metrics import token_f1_ids

    tok = load_f1_tokenizer(tokenizer)
    out = []
    for pred, gold in zip(preds, golds):
        p, g = tok.encode(pred), tok.encode(gold)
        out.append(token_f1_ids(p, g))
    return out
