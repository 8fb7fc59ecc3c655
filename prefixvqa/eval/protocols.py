"""Named evaluation protocols: how each published paper answered its questions and which numbers it reported.

A :class:`Protocol` is data: how closed questions are answered (candidate scoring or generation, and with which
candidates), which per-item metrics are averaged, which corpus metrics are computed, and whether bootstrap intervals
are attached. Turning predictions into numbers (:func:`compute_metrics`) is a pure function of (records, predictions),
so the same predictions always give the same metrics, and a run can be rescored without the model.

Registered protocols (README.md, "Published systems", says how each source answered and scored):

* ``llava_med``: LLaVA-Med v1.0.0's own ``closed_accuracy_llava_med`` and ``open_recall_llava_med`` (its code's
  numbers), beside the corrected ``closed_accuracy_strict`` and ``open_recall``, and ``closed_accuracy_substring``
  (gold contained in the prediction after prefixvqa's normalisation: prefixvqa's earlier rule, not upstream's); with
  ``upstream_metrics=True`` also ``closed_accuracy_llava_med_pre35`` (the script before LLaVA-Med's fix of #35,
  which dropped wrong yes/no answers from the denominator).
* ``prefix_vqa`` (van Sonsbeek et al.): ``exact_match`` accuracy, word-level ``bleu1``, ``bert_f1``, ``token_f1``;
  with ``upstream_metrics=True`` also their own variants by name: ``exact_match_upstream`` (lower-cased strings),
  ``char_bleu1_upstream`` (their nltk call on strings, which scores characters), ``token_f1_upstream`` (F1 on GPT-2
  token ids, whatever the decoder; tokenizer ``f1_tokenizer``) and ``bertscore_f1_upstream`` (bert_score's rule on
  ``bertscore_model`` at ``bertscore_layer``, default bert-base-uncased layer 9).
* ``med_flamingo``: ``exact_match`` and ``bert_f1``.
* ``pmc_vqa``: ``mc_accuracy``, the choice with the highest likelihood (``model.score_choices``) against the gold
  choice; never a letter string match.
* ``report``: corpus ``bleu1``/``bleu4`` and mean ``rouge_l``, each with a percentile bootstrap interval, plus
  ``bleu_signature`` (sacrebleu's signature string of how the BLEU numbers were computed); and LLaVA-Rad's own
  ``bleu1_llava_rad``, ``bleu4_llava_rad``, ``rouge_l_llava_rad`` with their own intervals.
* toolkit families, registered here from their own modules' ``PROTOCOL_SPECS``: ``medevalkit_vqa_rad``,
  ``medevalkit_slake``, ``medevalkit_pathvqa``, ``medevalkit_pmc_vqa`` (`eval.medevalkit`) and ``lmms_eval_slake``
  (`eval.lmms_eval`). They ask their own question text (``Protocol.prompt``) and score with their own rules
  (``Protocol.scorer``, optionally an LLM ``judge``), through the hooks of `eval.hooks`.

Every metric's source (repository, commit, file) is in ``eval.sources.METRIC_SOURCES`` and in metrics.json.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

from ..prompts import strip_choice_letter
from . import lmms_eval, medevalkit
from . import metrics as M
from . import upstream as U
from .errors import EvaluationError, UnknownProtocolError
from .hooks import PROMPTS, ROW_SCORERS

__all__ = [
    "Protocol",
    "PROTOCOLS",
    "ClosedMode",
    "CLOSED_MODES",
    "Candidates",
    "CANDIDATE_POLICIES",
    "check_closed_mode",
    "plan_items",
    "ITEM_FUNCS",
    "BATCHED_ITEM_METRICS",
    "CORPUS_FUNCS",
    "METRIC_LABELS",
    "register_protocol",
    "get_protocol",
    "list_protocols",
    "answer_type_of",
    "candidates_for",
    "listed_options",
    "is_yes_no_question",
    "gold_choice_index",
    "item_scores",
    "compute_metrics",
    "BREAKDOWN_FIELDS",
    "breakdowns",
]

#: How closed questions are answered: "score" ranks candidates by likelihood, "generate" generates freely. The one
#: spelling of these values: validation, the CLI's ``choices=`` and the docs read ``CLOSED_MODES``.
ClosedMode = Literal["score", "generate"]
CLOSED_MODES: tuple[str, ...] = get_args(ClosedMode)
#: Which candidates a scored closed question ranks (see :func:`candidates_for`).
Candidates = Literal["auto", "yes_no", "choices"]
CANDIDATE_POLICIES: tuple[str, ...] = get_args(Candidates)
Prediction = Mapping[str, Any]  # one row of predictions.jsonl: at least "prediction"; "choice_index" when scored

YES_NO = ("yes", "no")

#: Human-readable names used in report.md and compare() tables.
METRIC_LABELS: dict[str, str] = {
    "closed_accuracy_strict": "closed accuracy (strict)",
    "closed_accuracy_substring": "closed accuracy (gold a substring, prefixvqa normalisation)",
    "closed_accuracy_llava_med": "closed accuracy, LLaVA-Med v1.0.0 code",
    "closed_accuracy_llava_med_pre35": "closed accuracy, LLaVA-Med code before #35 (reference only)",
    "open_recall_llava_med": "open recall, LLaVA-Med v1.0.0 code",
    "bertscore_f1_upstream": "BERTScore F1, upstream (bert_score rule; reference only)",
    "bleu1_llava_rad": "BLEU-1, LLaVA-Rad code (sacrebleu defaults)",
    "bleu4_llava_rad": "BLEU-4, LLaVA-Rad code (sacrebleu defaults)",
    "rouge_l_llava_rad": "ROUGE-L F1, LLaVA-Rad code (bootstrap median)",
    "open_recall": "open recall",
    "exact_match": "accuracy (exact match)",
    "bleu1": "BLEU-1 (words)",
    "bleu4": "BLEU-4 (words)",
    "char_bleu1_upstream": "BLEU-1, upstream nltk call on strings (characters; reference only)",
    "exact_match_upstream": "accuracy, upstream (lower-cased strings equal; reference only)",
    "token_f1_upstream": "token F1, upstream (GPT-2 token ids; reference only)",
    "token_f1": "token F1",
    "bert_f1": "BERTScore-style F1",
    "mc_accuracy": "multiple-choice accuracy (likelihood)",
    "rouge_l": "ROUGE-L F1",
    "n": "items",
    "llava_primary": "per item: strict closed accuracy (closed), open recall (open)",
}


# --------------------------------------------------------------------------------------------------------------------
# Item-level facts shared by the runner and the metrics
# --------------------------------------------------------------------------------------------------------------------


def answer_type_of(record: Any) -> str:
    """The record's answer type; without one, "closed" if it has choices or a yes/no gold, else "open".

    The fallback reads the gold only to *classify* the item (as LLaVA-Med's answer_type fields were derived), never
    to answer it.
    """
    if record.answer_type in ("closed", "open"):
        return record.answer_type
    if record.choices or (record.answer is not None and M.normalize_answer(record.answer) in YES_NO):
        return "closed"
    return "open"


_WORD = r"[\w'/-]+"
#: "X or Y", "X, Y, or Z", "X vs. Y": the last alternatives clause of a question (articles after "or" skipped)
_ALTERNATIVES = re.compile(rf"((?:{_WORD},\s*)*{_WORD}),?\s+(?:or|vs\.?)\s+(?:(?:a|an|the)\s+)?({_WORD})", re.I)
#: words that open a yes/no question ("Is ...", "Does ...", elliptical "Any ...")
_POLAR = frozenset("is are was were do does did can could has have had will would should may might must shall any "
                   "anything".split())
#: words that may follow the last listed option without making it a longer phrase ("left or right of the ...",
#: "axial or coronal image?": golds name the option alone)
_FUNCTION_WORDS = frozenset("of in on at to than for from with within compared relative image images scan view plane "
                            "film slice section".split())
#: openings after which "or" joins things asked about, not alternatives ("Is there X or Y?" is answered yes/no)
_EXISTENTIAL = re.compile(r"^\s*(is there|are there|is there any|are there any|any|anything|evidence)\b", re.I)


def _alternatives(question: str) -> tuple[bool, list[str] | None]:
    """(asks to choose, the one-word options when they are certain). Options are certain when the last one ends the
    question or is followed by a function word: in "hyper dense or hypo dense?" or "left or right kidney?" the
    options are phrases whose extent one-word parsing cannot know, so such questions are generated instead."""
    if _EXISTENTIAL.match(question):
        return False, None
    text = question.strip().rstrip("?.! ")
    match = _ALTERNATIVES.search(text)
    if not match:
        return False, None
    options = [w.strip() for w in match.group(1).split(",") if w.strip()] + [match.group(2)]
    if len(set(map(str.lower, options))) < 2:
        return False, None
    after = text[match.end():].split()
    certain = not after or after[0].lower() in _FUNCTION_WORDS
    return True, (list(dict.fromkeys(options)) if certain else None)


def listed_options(question: str) -> list[str] | None:
    """The options a closed question lists ("axial, sagittal, or coronal?" -> those three), else None.

    One word per option, as VQA-RAD and SLAKE golds mostly are ("left", "hypodense"); existential questions ("Is there
    X or Y?", "Any X or Y?") ask yes/no and list nothing; phrase options of uncertain extent give None too.
    """
    return _alternatives(question)[1]


def is_yes_no_question(question: str) -> bool:
    """Opens like a yes/no question and asks to choose between nothing (the gold answer is never consulted)."""
    words = question.strip().split(maxsplit=1)
    return bool(words) and words[0].lower() in _POLAR and not _alternatives(question)[0]


def candidates_for(record: Any, policy: Candidates = "auto") -> list[str] | None:
    """Candidates to score for a closed question, or None to generate instead.

    ``"choices"``: the record's own choices (None without them). ``"yes_no"``: always ["yes", "no"] (the old rule,
    kept by name). ``"auto"``: the record's choices; else the options the question lists ("left, right, or both?");
    else ["yes", "no"] for a yes/no question; otherwise None, and the answer is generated. The gold answer is never
    consulted.
    """
    _check_candidates(policy)
    if policy == "yes_no":
        return list(YES_NO)
    if record.choices:
        return list(record.choices)
    if policy == "choices":
        return None
    options = listed_options(record.question)
    if options:
        return options
    return list(YES_NO) if is_yes_no_question(record.question) else None


def check_closed_mode(mode: str) -> ClosedMode:
    """``mode`` if it is one of ``CLOSED_MODES``; else an EvaluationError listing them."""
    if mode not in CLOSED_MODES:
        raise EvaluationError(f"closed_mode must be one of {', '.join(map(repr, CLOSED_MODES))}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _check_candidates(policy: str) -> None:
    if policy not in CANDIDATE_POLICIES:
        raise EvaluationError(f"candidates must be one of {', '.join(map(repr, CANDIDATE_POLICIES))}, got "
                              f"{policy!r}")


_LETTER = re.compile(r"^\(?([A-Za-z])[).:]?$")


def gold_choice_index(record: Any) -> int | None:
    """Index of the gold answer among the record's choices: by normalised text, else a lone letter ("B", "(c)").

    Letters are read only from the *gold* (PMC-VQA stores some answers as letters); predictions are always indices.
    """
    if not record.choices:
        return None
    gold = M.normalize_answer(record.answer)
    normalised = [M.normalize_answer(c) for c in record.choices]
    if gold in normalised:
        return normalised.index(gold)
    unlettered = [M.normalize_answer(strip_choice_letter(c)) for c in record.choices]  # "A: text", "(b) text"
    if gold in unlettered:
        return unlettered.index(gold)
    letter = _LETTER.match(record.answer.strip())
    if letter:
        index = ord(letter.group(1).upper()) - ord("A")
        if 0 <= index < len(record.choices):
            return index
    return None


# --------------------------------------------------------------------------------------------------------------------
# Per-item metrics: (record, prediction row) -> score, or None where the metric does not apply to the item
# --------------------------------------------------------------------------------------------------------------------

ItemMetric = Callable[[Any, Prediction], "float | None"]


def _closed_only(mode: M.MatchMode) -> ItemMetric:
    def fn(record: Any, pred: Prediction) -> float | None:
        return M.closed_match(pred["prediction"], record.answer, mode) if answer_type_of(record) == "closed" else None
    return fn


def _open_recall(record: Any, pred: Prediction) -> float | None:
    return M.open_recall(pred["prediction"], record.answer) if answer_type_of(record) == "open" else None


def _of_type(kind: str, fn: Callable[[str, str], "float | None"]) -> ItemMetric:
    """``fn(prediction, gold)`` on the items of answer type ``kind``, None on the others."""
    def item(record: Any, pred: Prediction) -> float | None:
        return fn(pred["prediction"], record.answer) if answer_type_of(record) == kind else None
    return item


def _mc_accuracy(record: Any, pred: Prediction) -> float | None:
    """Multiple-choice accuracy of one item: the chosen index (by likelihood) equals the gold choice's; prefixvqa's
    definition (prefixvqa/eval/protocols.py), equal to PMC-VQA's accuracy on the same chosen answers."""
    gold = gold_choice_index(record)
    if gold is None:
        return None
    return float(pred.get("choice_index") is not None and int(pred["choice_index"]) == gold)


def _llava_primary(record: Any, pred: Prediction) -> float | None:
    """The per-item score of the llava_med plots and confidence (prefixvqa's definition, prefixvqa/eval/protocols.py):
    strict closed accuracy on closed questions, open recall on open ones."""
    if answer_type_of(record) == "closed":
        return M.closed_match(pred["prediction"], record.answer, "strict")
    return M.open_recall(pred["prediction"], record.answer)


#: The metric registry. Per-item metrics ``(record, prediction row) -> score or None`` by name (the names protocols
#: list and metrics.json reports); ``BATCHED_ITEM_METRICS`` are per-item too but need one model pass over all items
#: (see :func:`item_scores`); ``CORPUS_FUNCS`` ``(predictions, references) -> score`` on the whole set.
ITEM_FUNCS: dict[str, ItemMetric] = {
    "closed_accuracy_strict": _closed_only("strict"),
    "closed_accuracy_substring": _closed_only("substring"),
    "open_recall": _open_recall,
    "exact_match": lambda r, p: M.exact_match(p["prediction"], r.answer),
    "token_f1": lambda r, p: M.token_f1(p["prediction"], r.answer),
    "bleu1": lambda r, p: M.sentence_bleu([p["prediction"]], [r.answer], n=1)[0],
    "char_bleu1_upstream": lambda r, p: M.char_bleu1_upstream(p["prediction"], r.answer),
    "exact_match_upstream": lambda r, p: M.exact_match_upstream(p["prediction"], r.answer),
    "closed_accuracy_llava_med": _of_type("closed", U.llava_med_closed),
    "closed_accuracy_llava_med_pre35": _of_type("closed", U.llava_med_closed_pre35),
    "open_recall_llava_med": _of_type("open", U.llava_med_open_recall),
    "rouge_l": lambda r, p: M.rouge_l(p["prediction"], r.answer),
    "mc_accuracy": _mc_accuracy,
    "llava_primary": _llava_primary,
}

def _bertscore_upstream(protocol: "Protocol", preds: list[str], golds: list[str]) -> list[float]:
    from .bertscore import bertscore

    return bertscore(preds, golds, protocol.bertscore_model, protocol.bertscore_layer)["f1"]


#: per-item metrics that load a model or tokenizer once for all items: (protocol, predictions, golds) -> scores
BATCHED_FUNCS: dict[str, Callable[["Protocol", list[str], list[str]], list[float]]] = {
    "bert_f1": lambda pr, p, g: M.bert_similarity(p, g, pr.bert_model_path, layer=pr.bert_layer)["f1"],
    "token_f1_upstream": lambda pr, p, g: U.gpt2_token_f1(p, g, pr.f1_tokenizer),
    "bertscore_f1_upstream": _bertscore_upstream,
}
BATCHED_ITEM_METRICS = tuple(BATCHED_FUNCS)
CORPUS_FUNCS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    f"bleu{k}": functools.partial(M.bleu, n=k) for k in range(1, 5)
}
#: corpus metrics that come with their source's own interval: (predictions, references) -> (value, low, high)
CORPUS_CI_FUNCS: dict[str, Callable[[Sequence[str], Sequence[str]], tuple[float, float, float]]] = {
    "bleu1_llava_rad": functools.partial(U.llava_rad_bleu, n=1),
    "bleu4_llava_rad": functools.partial(U.llava_rad_bleu, n=4),
    "rouge_l_llava_rad": U.llava_rad_rouge_l,
}


@dataclass(frozen=True)
class Protocol:
    """One named way to answer and score a test set.

    ``item_metrics`` are averaged over the items they apply to (and drive the breakdown tables); ``corpus_metrics``
    (names ``bleuN``) are computed on the whole set. With ``bootstrap`` every reported number gets ``_ci_low`` and
    ``_ci_high`` from ``n_resamples`` seeded resamples. ``primary`` is the per-item metric of the plots.
    """

    name: str
    description: str
    item_metrics: tuple[str, ...]
    primary: str
    corpus_metrics: tuple[str, ...] = ()
    closed_mode: ClosedMode = "score"  # how closed questions are answered unless the runner is told otherwise
    candidates: Candidates = "auto"  # which candidates a scored closed question ranks (see candidates_for)
    score_all: bool = False  # every item is answered by scoring its choices (multiple-choice sets)
    bootstrap: bool = False
    n_resamples: int = 1000
    seed: int = 0
    bert_model_path: str | None = None  # bert_f1's encoder; None: metrics.default_similarity_model_path()
    bert_layer: int | None = None  # bert_f1's hidden_states index; None: the last layer
    f1_tokenizer: str = "gpt2"  # token_f1_upstream counts this tokenizer's ids (hub id or local folder)
    bertscore_model: str = "bert-base-uncased"  # bertscore_f1_upstream's encoder (hub id or local folder)
    bertscore_layer: int | None = None  # None: bert_score's default layer for bertscore_model (9 for bert-base)
    upstream_metrics: tuple[str, ...] = ()  # the source's own (uncorrected) variants (upstream_metrics=True)
    prompt: str | None = None  # a registered prompt builder (eval.hooks): the question text asked; None: as recorded
    scorer: str | None = None  # a registered row scorer (eval.hooks) whose per-item metrics this protocol lists
    judge: str | None = None  # a registered LLM judge the scorer consults; None: off
    datasets: tuple[str, ...] = ()  # the datasets (meta["dataset"]) it is defined for; (): any
    source: str = ""  # the upstream code it reproduces: repository @ commit: files

    def __post_init__(self) -> None:
        _check_hooks(self)
        known = set(ITEM_FUNCS) | set(BATCHED_ITEM_METRICS) | set(ROW_SCORERS[self.scorer].metrics if self.scorer
                                                                     else ())
        unknown = [m for m in (*self.item_metrics, self.primary) if m not in known]
        if unknown:
            raise EvaluationError(f"protocol {self.name!r}: unknown item metric(s) {unknown}; known: "
                                  f"{sorted(known)}")
        bad = [m for m in self.corpus_metrics if m not in CORPUS_FUNCS and m not in CORPUS_CI_FUNCS]
        if bad:
            raise EvaluationError(f"protocol {self.name!r}: unknown corpus metric(s) {bad}; known: "
                                  f"{sorted([*CORPUS_FUNCS, *CORPUS_CI_FUNCS])}")
        check_closed_mode(self.closed_mode)
        unknown = [m for m in self.upstream_metrics if m not in known]
        if unknown:
            raise EvaluationError(f"protocol {self.name!r}: unknown upstream metric(s) {unknown}")
        _check_candidates(self.candidates)

    @property
    def all_item_metrics(self) -> tuple[str, ...]:
        """Every per-item metric this protocol computes (listed, upstream variants, primary), each once, in order:
        the columns of the breakdown tables."""
        return tuple(dict.fromkeys((*self.item_metrics, *self.upstream_metrics, self.primary)))

    def settings(self) -> dict[str, Any]:
        """JSON-able description, written to manifests so a result names exactly how it was computed."""
        return dataclasses.asdict(self)


def _check_hooks(protocol: Protocol) -> None:
    """The prompt and scorer a protocol names are registered, and a judge only where its scorer takes one."""
    if protocol.prompt is not None and protocol.prompt not in PROMPTS:
        raise EvaluationError(f"protocol {protocol.name!r}: unknown prompt {protocol.prompt!r}; registered: "
                              f"{sorted(PROMPTS)}")
    if protocol.scorer is not None and protocol.scorer not in ROW_SCORERS:
        raise EvaluationError(f"protocol {protocol.name!r}: unknown scorer {protocol.scorer!r}; registered: "
                              f"{sorted(ROW_SCORERS)}")
    if protocol.judge is not None and not (protocol.scorer and ROW_SCORERS[protocol.scorer].judged):
        raise EvaluationError(f"protocol {protocol.name!r} has no LLM judge step (judge={protocol.judge!r})")


PROTOCOLS: dict[str, Protocol] = {}
#: each protocol's source metrics as the source computed them, reported beside the corrected ones on request
UPSTREAM_VARIANTS: dict[str, tuple[str, ...]] = {
    "prefix_vqa": ("exact_match_upstream", "char_bleu1_upstream", "token_f1_upstream", "bertscore_f1_upstream"),
    "llava_med": ("closed_accuracy_llava_med_pre35",),
}


def register_protocol(protocol: Protocol, *, overwrite: bool = False) -> Protocol:
    """Add a protocol to the registry (by name); refuse to replace one silently."""
    if protocol.name in PROTOCOLS and not overwrite:
        raise EvaluationError(f"protocol {protocol.name!r} is already registered (pass overwrite=True)")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def list_protocols() -> list[str]:
    """Registered protocol names, sorted: what the CLI offers and error messages list."""
    return sorted(PROTOCOLS)


def get_protocol(protocol: str | Protocol, **options: Any) -> Protocol:
    """A registered protocol by name (or a Protocol as is), with field overrides such as ``closed_mode="generate"``,
    ``bert_model_path=...``, ``n_resamples=200`` or ``upstream_metrics=True`` (the protocol's ``UPSTREAM_VARIANTS``)."""
    if options.get("upstream_metrics") is True:
        name = protocol if isinstance(protocol, str) else protocol.name
        options["upstream_metrics"] = UPSTREAM_VARIANTS.get(name, ())
    elif options.get("upstream_metrics") is False:
        options["upstream_metrics"] = ()
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise UnknownProtocolError(f"unknown protocol {protocol!r}; registered: {list_protocols()}")
        protocol = PROTOCOLS[protocol]
    return dataclasses.replace(protocol, **options) if options else protocol


register_protocol(Protocol(
    "llava_med", "LLaVA-Med: every question answered by generation (as upstream); closed accuracy and open recall "
                 "as LLaVA-Med v1.0.0's code computes them, and corrected (strict closed accuracy, open recall).",
    item_metrics=("closed_accuracy_llava_med", "open_recall_llava_med", "closed_accuracy_strict",
                  "closed_accuracy_substring", "open_recall"), primary="llava_primary",
    closed_mode="generate"))
register_protocol(Protocol(
    "prefix_vqa", "van Sonsbeek et al.: every question answered by generation (upstream: beam search); exact-match "
                  "accuracy, word BLEU-1, BERTScore-style F1, token F1; upstream variants by name.",
    item_metrics=("exact_match", "bleu1", "bert_f1", "token_f1"), primary="exact_match", closed_mode="generate"))
register_protocol(Protocol(
    "med_flamingo", "Med-Flamingo: every question answered by generation; exact match and BERT-sim (BERTScore-style "
                    "F1).",
    item_metrics=("exact_match", "bert_f1"), primary="exact_match", closed_mode="generate"))
register_protocol(Protocol(
    "pmc_vqa", "PMC-VQA: multiple-choice accuracy, the choice of highest likelihood (never letter matching).",
    item_metrics=("mc_accuracy",), primary="mc_accuracy", candidates="choices", score_all=True))
register_protocol(Protocol(
    "report", "Report generation: corpus BLEU-1/4 and ROUGE-L, with percentile bootstrap intervals; and LLaVA-Rad's "
              "BLEU-1/4 and ROUGE-L as its code computes them, with its intervals.",
    item_metrics=("rouge_l",), corpus_metrics=("bleu1", "bleu4", "bleu1_llava_rad", "bleu4_llava_rad",
                                               "rouge_l_llava_rad"), primary="rouge_l", closed_mode="generate",
    bootstrap=True))
for _spec in (*medevalkit.PROTOCOL_SPECS, *lmms_eval.PROTOCOL_SPECS):  # toolkit families, from their own modules
    register_protocol(Protocol(**_spec))
METRIC_LABELS.update({**medevalkit.METRIC_LABELS, **lmms_eval.METRIC_LABELS})


def plan_items(records: Sequence[Any], protocol: Protocol, closed_mode: str | None = None) -> list[list[str] | None]:
    """Per record, the candidates to score, or None to generate: the protocol's answering rule, made explicit (the
    plan `inference.answer_records` follows). ``closed_mode`` overrides the protocol's."""
    mode = check_closed_mode(closed_mode or protocol.closed_mode)
    if protocol.score_all and mode == "generate":
        raise EvaluationError(f"protocol {protocol.name!r} ranks choices by likelihood; closed_mode='generate' would "
                              "turn it into string matching")
    plan: list[list[str] | None] = []
    for record in records:
        scored = protocol.score_all or (mode == "score" and answer_type_of(record) == "closed")
        cands = candidates_for(record, protocol.candidates) if scored else None
        if protocol.score_all and not cands:
            raise EvaluationError(f"protocol {protocol.name!r}: record {record.id!r} has no choices to score")
        plan.append(cands)
    return plan


# --------------------------------------------------------------------------------------------------------------------
# From predictions to numbers (pure)
# --------------------------------------------------------------------------------------------------------------------


def item_scores(protocol: Protocol, records: Sequence[Any],
                predictions: Sequence[Prediction]) -> list[dict[str, float]]:
    """Per-item scores: one dict per record with the item metrics that apply to it (``primary`` included)."""
    if len(records) != len(predictions):
        raise EvaluationError(f"got {len(predictions)} predictions for {len(records)} records")
    for record, pred in zip(records, predictions):
        if "id" in pred and str(pred["id"]) != str(record.id):
            raise EvaluationError(f"prediction for {pred['id']!r} is aligned with record {record.id!r}")
    names = protocol.all_item_metrics
    rows: list[dict[str, float]] = []
    for record, pred in zip(records, predictions):
        row = {}
        for name in names:
            value = ITEM_FUNCS[name](record, pred) if name in ITEM_FUNCS else None
            if value is not None:
                row[name] = float(value)
        rows.append(row)
    for name, fn in BATCHED_FUNCS.items():
        if name in names and records:
            values = fn(protocol, [p["prediction"] for p in predictions], [r.answer for r in records])
            for row, value in zip(rows, values):
                row[name] = float(value)
    if protocol.scorer:  # a toolkit's own scoring of the whole answer set (eval.hooks.RowScorer)
        for row, extra in zip(rows, ROW_SCORERS[protocol.scorer].score(protocol, records, predictions)):
            row.update({k: float(v) for k, v in extra.items() if k in names})
    return rows


#: Groupings of the breakdown tables: (field, title). Only those the data has are reported.
BREAKDOWN_FIELDS: tuple[tuple[str, str], ...] = (
    ("answer_type", "answer type"), ("question_type", "question type"), ("content_type", "content type"),
    ("modality", "modality"), ("organ", "organ"), ("location", "location"),
)


def _group_value(record: Any, field: str) -> str | None:
    value = answer_type_of(record) if field == "answer_type" else record.meta.get(field)
    if value is None or value == "":
        return None
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def breakdowns(protocol: Protocol, records: Sequence[Any], rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """{field: {value: {metric: mean, "n": count}}} for every breakdown field the data has: the per-group means
    behind metrics.json's "breakdown", the report's tables and the per-type plot."""
    out: dict[str, Any] = {}
    for field, _ in BREAKDOWN_FIELDS:
        groups: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            value = _group_value(record, field)
            if value is not None:
                groups.setdefault(value, []).append(i)
        if not groups:
            continue
        table = {}
        for value, idx in sorted(groups.items()):
            cell: dict[str, float] = {"n": len(idx)}
            for name in protocol.all_item_metrics:
                vals = [rows[i][name] for i in idx if name in rows[i]]
                if vals:
                    cell[name] = sum(vals) / len(vals)
            table[value] = cell
        out[field] = table
    return out


def _aggregate(protocol: Protocol, records: Sequence[Any], predictions: Sequence[Prediction],
               rows: Sequence[Mapping[str, float]]) -> dict[str, float | str]:
    out: dict[str, float | str] = {"n": len(records)}
    for name in protocol.all_item_metrics:
        values = [row[name] for row in rows if name in row]
        if not values:
            continue
        out[name] = sum(values) / len(values)
        if name not in protocol.item_metrics and name not in protocol.upstream_metrics:
            continue
        out[f"n_{name}"] = len(values)
        if protocol.bootstrap:
            _, low, high = M.bootstrap_ci(values, n_resamples=protocol.n_resamples, seed=protocol.seed)
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    preds, golds = [p["prediction"] for p in predictions], [r.answer for r in records]
    for name in protocol.corpus_metrics:
        if name in CORPUS_CI_FUNCS:  # the source's own point and interval
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = CORPUS_CI_FUNCS[name](preds, golds)
            continue
        fn = CORPUS_FUNCS[name]
        if protocol.bootstrap:
            out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = M.bootstrap_ci(
                (preds, golds), fn, n_resamples=protocol.n_resamples, seed=protocol.seed)
        else:
            out[name] = fn(preds, golds)
    if any(name in CORPUS_FUNCS for name in protocol.corpus_metrics):  # a string among the numbers: tables skip it, the result folder keeps it
        out["bleu_signature"] = M.bleu_signature()
    summary = ROW_SCORERS[protocol.scorer].summary if protocol.scorer else None
    if summary is not None:
        out.update(summary(protocol, out))
    return out


def compute_metrics(protocol: str | Protocol, records: Sequence[Any], predictions: Sequence[Prediction],
                    *, rows: Sequence[Mapping[str, float]] | None = None) -> dict[str, float | str]:
    """Overall metrics of ``predictions`` (rows as written to predictions.jsonl) against ``records``; deterministic.

    Item metrics are means over the items they apply to (``n_<metric>`` says how many); corpus metrics use the
    whole set, and then ``bleu_signature`` (a string) says how BLEU was computed. Pass precomputed ``rows`` (from
    :func:`item_scores`) to avoid scoring twice.
    """
    protocol = get_protocol(protocol)
    if not records:
        raise EvaluationError("no records to evaluate")
    rows = item_scores(protocol, records, predictions) if rows is None else rows
    return _aggregate(protocol, records, predictions, rows)
