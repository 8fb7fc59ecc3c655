"""MedEvalKit's VQA protocols: its prompts, answer extraction and scoring for VQA-RAD, SLAKE, PathVQA and PMC-VQA.

Source: alibaba-damo-academy/MedEvalKit @ 9b12e3b34232a8779cc1275417bf4f72f03d28e0 (2026-02-24):
``utils/question_formats.py`` (the instructions appended to a question), ``utils/utils.py`` (``parse_response``,
``judge_judgement``, ``judge_close_end_vqa``, ``judge_open_end_vqa``, ``judge_multi_choice``, ``calculate_f1``, its
``bleu``/``rouge`` calls, the LLM judge's prompt) and each dataset's ``cal_metrics`` (``utils/VQA_RAD/VQA_RAD.py``,
``utils/SLAKE/SLAKE.py``, ``utils/PATH_VQA/PATH_VQA.py``, ``utils/PMC_VQA/PMC_VQA.py``). The rules are written anew
here from that code; the numbers equal its output on the same responses (tests work them out by hand):

* prompts: VQA-RAD and PathVQA pick the instruction by the *gold* answer (yes/no -> "Please output 'yes' or 'no'(no
  extra output).", else "Please answer the question concisely."); SLAKE by its answer_type (open -> concise, closed ->
  "Answer the question using a single word or phrase."), in the question's language; PMC-VQA lists "A:text" options
  and asks for the letter. Non-reasoning mode (upstream's default, ``REASONING`` unset).
* closed yes/no: correct when the parsed response contains exactly one of "yes"/"no" (as substrings: "not" and
  "none" contain "no") and contains the gold; other closed (SLAKE): parsed response without "." and newlines equals
  the gold; open: exact match (``mek_open_em``, also the item's accuracy), nltk BLEU-1..4 on its tokenisation,
  ``rouge`` 1.0.1's ROUGE-1/2/L F, token-set precision/recall/F1. PMC-VQA: letter or option text, else the most
  similar option (difflib).
* averages as ``cal_metrics`` divides: ``mek_accuracy`` = its "total metrics" acc, ``mek_closed_accuracy`` = "close"
  acc, ``mek_open_*`` = the "open" block.

Where upstream's arithmetic is off, the corrected number carries the plain name and upstream's printed one is reported
beside it by name (README, "MedEvalKit and lmms-eval protocols"): ``calculate_f1`` returns (f1, precision, recall)
but is unpacked as (precision, recall, f1), so its "precision" column is the F1 (``mek_open_token_f1``), "recall" the
precision and "f1" the recall; its open "acc" is divided by the open count twice (``mek_open_acc_printed``).
"""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..prompts import strip_choice_letter
from . import metrics as M
from .errors import EvaluationError
from .hooks import RowScorer, get_judge, register_prompt, register_scorer

__all__ = ["COMMIT", "SOURCE", "PROTOCOL_SPECS", "METRIC_LABELS", "prompt_for", "extract_boxed", "extract_tag",
           "pre_extract", "parse_response", "judge_judgement", "judge_close_end", "judge_open_end",
           "judge_multi_choice", "bleu", "rouge", "token_set_prf", "compare_messages"]

REPO = "alibaba-damo-academy/MedEvalKit"
COMMIT = "9b12e3b34232a8779cc1275417bf4f72f03d28e0"
SOURCE = (f"{REPO} @ {COMMIT}: utils/question_formats.py, utils/utils.py, utils/{{file}} (cal_metrics)")

# ------------------------------------------------------------------------------------------------------ prompts
_INSTRUCTIONS = {  # (kind, language) -> the line MedEvalKit appends after the question (non-reasoning mode)
    ("judgement", "en"): "Please output 'yes' or 'no'(no extra output).",
    ("judgement", "zh"): "请输出'是'或'否'(不要有任何其它输出)。",
    ("close", "en"): "Answer the question using a single word or phrase.",
    ("close", "zh"): "请用一个单词或者短语回答该问题。",
    ("open", "en"): "Please answer the question concisely.",
    ("open", "zh"): "请简要回答该问题。",
}
_MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _mc_options(record: Any) -> list[str]:
    """PMC-VQA's option cells as upstream reads them from test_2.csv ("A:text"), rebuilt from the reader's choices."""
    choices = record.choices or []
    return [f"{letter}:{strip_choice_letter(c)}" for letter, c in zip(_letters(len(choices)), choices)]


def prompt_for(variant: str, record: Any) -> str:
    """The text MedEvalKit sends for ``record`` under ``variant`` ("vqa_rad", "pathvqa", "slake", "pmc_vqa")."""
    question = record.question
    if variant == "pmc_vqa":
        options = "\n".join(_mc_options(record))
        return f"\nQuestion: {question}\nOptions: \n{options}\n{_MC_INSTRUCTION}"
    if variant == "slake":
        lang = "zh" if (record.meta or {}).get("q_lang") == "zh" else "en"
        kind = "open" if record.answer_type == "open" else "close"
        return f"{question}\n{_INSTRUCTIONS[(kind, lang)]}"
    gold = record.answer.lower() if variant == "vqa_rad" else record.answer  # PathVQA: the gold as stored
    return f"{question}\n{_INSTRUCTIONS[('judgement' if gold in ('yes', 'no') else 'open', 'en')]}"


# --------------------------------------------------------------------------------------------- answer extraction
def extract_boxed(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced, stripped), or the string "None" without one
    (mathruler 0.1.0's ``extract_boxed_content``, which MedEvalKit calls)."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content, depth = text[start + len("\\boxed{"):], 0
    for i, char in enumerate(content):
        depth += (char == "{") - (char == "}")
        if depth == -1:
            return content[:i].strip()
    return "None"


def extract_tag(text: str, tag: str, hard: bool = True) -> str:
    """Every ``<tag>...</tag>`` span joined by spaces; without one, the text itself (``hard``) or ""."""
    if not text:
        return ""
    opening, closing, parts, pos = f"<{tag}>", f"</{tag}>", [], text.find(f"<{tag}>")
    while pos != -1:
        end = text.find(closing, pos + len(opening))
        if end == -1:
            break
        parts.append(text[pos + len(opening):end] + " ")
        pos = text.find(opening, end + len(closing))
    found = "".join(parts).strip()
    return found or (text if hard else "")


def pre_extract(response: str) -> str:
    """``cal_metrics``' first step on a raw response: a boxed answer, else the ``<answer>`` span, else as is."""
    boxed = extract_boxed(response)
    if boxed != "None":
        return boxed
    return extract_tag(response, "answer") if "<answer>" in response else response


_ANSWER_PATTERNS = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
                    "final answer", "final answer is")


def parse_response(response: str) -> str:
    """``parse_response``: lower-cased; boxed or ``<answer>`` content; then, pattern by pattern, what follows the
    last "answer is", "answer:", ... (not stripped)."""
    response = response.lower()
    if "boxed" in response:
        response = extract_boxed(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    for pattern in _ANSWER_PATTERNS:
        if pattern in response:
            response = response.split(pattern)[-1]
    return response


# ------------------------------------------------------------------------------------------------------ judging
def _flat(response: str) -> str:
    return parse_response(response).replace("\n", "").replace(".", "")


def judge_judgement(answer: str, response: str) -> bool:
    """Yes/no: the parsed response holds exactly one of the substrings "yes"/"no" and holds the gold."""
    answer, response = answer.lower(), _flat(response)
    return (("yes" in response) != ("no" in response)) and answer in response


def judge_close_end(answer: str, response: str) -> bool:
    """Other closed questions (SLAKE): the parsed response without "." and newlines equals the lower-cased gold."""
    return _flat(response) == answer.lower()


def _tokens(text: str) -> list[str]:
    return text.lower().replace(".", " .").split(" ")


def bleu(pred: str, target: str, n: int) -> float:
    """MedEvalKit's ``bleu``: nltk ``sentence_bleu`` with weights (1/n,)*n and no smoothing, on text lower-cased, "."
    split off and split at single spaces."""
    bleu_score = M._require("nltk.translate.bleu_score", "nltk")
    with warnings.catch_warnings():  # nltk warns on every missing n-gram order
        warnings.simplefilter("ignore")
        return float(bleu_score.sentence_bleu([_tokens(target)], _tokens(pred), weights=[1 / n] * n))


def _sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if part]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """The words of the one longest common subsequence ``rouge`` reconstructs (ties: step along the hypothesis)."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if ref[i - 1] == hyp[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), len(ref), len(hyp)
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + 1e-8))


def rouge(pred: str, target: str) -> dict[str, float]:
    """MedEvalKit's ``rouge``: the ``rouge`` package 1.0.1 (``Rouge().get_scores``, exclusive n-gram *sets*) on the
    lower-cased texts: F of ROUGE-1, ROUGE-2 and summary-level ROUGE-L (union LCS), each with its 1e-8 in the
    denominator. Upstream raises on a hypothesis with no sentence ("", "."); that scores 0 here."""
    hyp, ref = _sentences(pred.lower()), _sentences(target.lower())
    if not hyp or not ref:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougel": 0.0}
    hyp_words = [w for s in hyp for w in s.split(" ")]
    ref_words = [w for s in ref for w in s.split(" ")]
    out = {}
    for n in (1, 2):
        h = {tuple(hyp_words[i:i + n]) for i in range(len(hyp_words) - n + 1)}
        g = {tuple(ref_words[i:i + n]) for i in range(len(ref_words) - n + 1)}
        overlap = len(h & g)
        out[f"rouge{n}"] = _f(overlap / len(h) if h else 0.0, overlap / len(g) if g else 0.0)
    union: set[str] = set()
    for r in ref:
        for h_sentence in hyp:
            union |= _lcs_words(r.split(" "), h_sentence.split(" "))
    out["rougel"] = _f(len(union) / len(set(hyp_words)), len(union) / len(set(ref_words)))
    return out


def token_set_prf(pred: str, gold: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the lower-cased whitespace token *sets* (``calculate_f1``'s quantities, in their
    true order); 0s where either set is empty (upstream raises there)."""
    p_set, g_set = set(pred.lower().split()), set(gold.lower().split())
    if not p_set or not g_set:
        return 0.0, 0.0, 0.0
    common = len(p_set & g_set)
    precision, recall = common / len(p_set), common / len(g_set)
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def judge_open_end(answer: str, response: str) -> dict[str, float]:
    """``judge_open_end_vqa``: exact match of the parsed response with the lower-cased gold, BLEU-1..4, ROUGE-1/2/L,
    token-set precision/recall/F1 (under their true names)."""
    answer, response = answer.lower(), parse_response(response)
    out = {"em": float(response == answer), **{f"bleu{n}": bleu(response, answer, n) for n in range(1, 5)},
           **rouge(response, answer)}
    out["token_precision"], out["token_recall"], out["token_f1"] = token_set_prf(response, answer)
    return out


def judge_multi_choice(choices: Sequence[str], answer: str, response: str) -> bool:
    """``judge_multi_choice``: the response's letter (first or last paragraph), else its parsed first sentence's last
    ":" part as a letter or an option's text, else the option most similar to the whole response (difflib ratio,
    first maximum), compared with the gold (a letter or an option's text)."""
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    if response.split("\n\n")[0] in alphas:
        response = response.split("\n\n")[0]
    elif response.split("\n\n")[-1].split(".")[0] in alphas:
        response = response.split("\n\n")[-1].split(".")[0]
    response = parse_response(response).strip().lower().replace("\n", "")
    lowered = [c.lower() for c in choices]
    picked = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if picked == answer:
        return True
    if picked in alphas:
        return lowered[ord(picked) - ord("a")] == answer
    if picked in lowered:
        return answer in alphas and picked == lowered[ord(answer) - ord("a")]
    best, best_ratio = 0, 0.0
    for i, choice in enumerate(lowered):
        ratio = difflib.SequenceMatcher(None, choice, response).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return alphas[best] == answer or lowered[best] == answer


# ------------------------------------------------------------------------------------------------------ LLM judge
_COMPARE = """
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers \
(for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the \
standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, \
so it is correct.</think>
<judge>0</judge>
    """


def compare_messages(question: str, response: str, answer: str) -> list[dict[str, str]]:
    """The chat MedEvalKit sends its judge model (``get_compare_messages``): one user message."""
    return [{"role": "user", "content": _COMPARE.format(question=question, answer=answer, response=response)}]


def _verdicts(judge_name: str, items: Sequence[tuple[str, str, str]]) -> list[bool]:
    """The judge's verdicts: its reply's ``<judge>`` content (the whole reply without one) equal to "0"."""
    replies = list(get_judge(judge_name)([compare_messages(*item) for item in items]))
    if len(replies) != len(items):
        raise EvaluationError(f"judge {judge_name!r} returned {len(replies)} replies for {len(items)} questions")
    return [extract_tag(reply or "", "judge") == "0" for reply in replies]


# ------------------------------------------------------------------------------------------- scoring an answer set
@dataclass(frozen=True)
class _Variant:
    """One dataset's ``cal_metrics``: its file, the reader's dataset name, and which items its judge re-scores."""

    key: str
    dataset: str
    file: str
    title: str


VARIANTS = {v.key: v for v in (
    _Variant("vqa_rad", "vqa_rad", "VQA_RAD/VQA_RAD.py", "VQA-RAD"),
    _Variant("slake", "slake", "SLAKE/SLAKE.py", "SLAKE"),
    _Variant("pathvqa", "pathvqa", "PATH_VQA/PATH_VQA.py", "PathVQA"),
    _Variant("pmc_vqa", "pmc_vqa", "PMC_VQA/PMC_VQA.py", "PMC-VQA"),
)}
OPEN_METRICS = ("mek_open_em", "mek_open_bleu1", "mek_open_bleu2", "mek_open_bleu3", "mek_open_bleu4",
                "mek_open_rouge1", "mek_open_rouge2", "mek_open_rougel", "mek_open_token_precision",
                "mek_open_token_recall", "mek_open_token_f1")
VQA_METRICS = ("mek_accuracy", "mek_closed_accuracy", "mek_open_accuracy", *OPEN_METRICS, "mek_judge_correct")
METRIC_LABELS = {
    "mek_accuracy": "MedEvalKit accuracy ('total metrics' acc)",
    "mek_closed_accuracy": "MedEvalKit closed accuracy ('close' acc)",
    "mek_open_accuracy": "MedEvalKit open accuracy (exact match, or the judge's verdict)",
    "mek_open_acc_printed": "MedEvalKit open 'acc' as its file prints it (divided by the open count twice)",
    "mek_open_em": "MedEvalKit open exact match ('em')",
    **{f"mek_open_bleu{n}": f"MedEvalKit open BLEU-{n} (nltk, unsmoothed)" for n in range(1, 5)},
    "mek_open_rouge1": "MedEvalKit open ROUGE-1 F ('rouge1')",
    "mek_open_rouge2": "MedEvalKit open ROUGE-2 F ('rouge2')",
    "mek_open_rougel": "MedEvalKit open ROUGE-L F ('rougel')",
    "mek_open_token_f1": "MedEvalKit open token-set F1 (its column 'precision')",
    "mek_open_token_precision": "MedEvalKit open token-set precision (its column 'recall')",
    "mek_open_token_recall": "MedEvalKit open token-set recall (its column 'f1')",
    "mek_judge_correct": "MedEvalKit LLM judge: share of judged items called correct",
}


def _gold_letter(record: Any) -> str:
    """PMC-VQA's gold as upstream's test_2.csv gives it: the option letter (the reader keeps it in
    meta["answer_label"]; else the letter of the choice equal to the answer)."""
    label = (record.meta or {}).get("answer_label")
    if label:
        return str(label)
    texts = [strip_choice_letter(c).strip().lower() for c in record.choices or []]
    answer = strip_choice_letter(record.answer or "").strip().lower()
    if answer in texts:
        return _letters(len(texts))[texts.index(answer)]
    raise EvaluationError(f"record {record.id!r}: its answer {record.answer!r} is none of its choices; MedEvalKit's "
                          "PMC-VQA scoring needs the gold option's letter")


def _score_item(variant: str, record: Any, prediction: str) -> tuple[dict[str, float], tuple[str, str, str] | None]:
    """One item's scores under ``variant``'s ``cal_metrics``, and what its judge would be asked (question, response,
    gold) where the judge re-scores this item."""
    if variant == "pmc_vqa":
        return {"mek_accuracy": float(judge_multi_choice(_mc_options(record), _gold_letter(record), prediction))}, None
    response = pre_extract(prediction)
    answer = record.answer
    if variant == "slake":  # SLAKE: no lower-casing or stripping before the judge functions; closed by answer_type
        is_open = record.answer_type == "open"
    else:  # VQA-RAD, PathVQA: both lower-cased and stripped; closed means a yes/no gold
        response, answer = response.lower().strip(), answer.lower().strip()
        is_open = answer not in ("yes", "no")
    if is_open:
        scores = judge_open_end(answer, response)
        row = {"mek_accuracy": scores["em"], "mek_open_accuracy": scores["em"],
               **{f"mek_open_{k}": v for k, v in scores.items()}}
    else:
        rule = judge_judgement if answer in ("yes", "no") else judge_close_end
        correct = float(rule(answer, response))
        row = {"mek_accuracy": correct, "mek_closed_accuracy": correct}
    judged = is_open or variant == "slake"  # SLAKE's judge re-scores every item, the others open ones only
    return row, ((record.question, response, answer) if judged else None)


def _apply_verdict(variant: str, row: dict[str, float], verdict: bool) -> None:
    """Fold one judged item's verdict into its scores as the variant's ``cal_metrics`` counts it: open items take the
    verdict as their accuracy; SLAKE adds it to a closed item's rule-based count (its file counts such an item twice,
    so a closed SLAKE item can score 2); PathVQA resets closed counts to 0 (its judge only sees open items)."""
    v = float(verdict)
    row["mek_judge_correct"] = v
    if "mek_open_accuracy" in row:
        row["mek_accuracy"] = row["mek_open_accuracy"] = v
    elif variant == "slake":
        row["mek_accuracy"] += v
        row["mek_closed_accuracy"] += v


def score_rows(variant: str, protocol: Any, records: Sequence[Any],
               predictions: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per-item MedEvalKit scores for a whole answer set, equal to alibaba-damo-academy/MedEvalKit @ 9b12e3b's
    ``cal_metrics`` (utils/<dataset>/<dataset>.py); with ``protocol.judge`` the judge re-scores as upstream's
    ``use_llm_judge=True`` does (one batch of questions)."""
    rows, asks = [], []
    for i, (record, pred) in enumerate(zip(records, predictions)):
        row, ask = _score_item(variant, record, str(pred["prediction"]))
        rows.append(row)
        if ask is not None:
            asks.append((i, ask))
    if getattr(protocol, "judge", None):
        if variant == "pathvqa":
            for row in rows:
                if "mek_closed_accuracy" in row:
                    row["mek_accuracy"] = row["mek_closed_accuracy"] = 0.0
        for (i, _), verdict in zip(asks, _verdicts(protocol.judge, [ask for _, ask in asks])):
            _apply_verdict(variant, rows[i], verdict)
    return rows


def summary(protocol: Any, overall: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers MedEvalKit prints that are not plain averages: its open "acc" (divided by the open count twice), and
    the judge that scored (a string; tables skip it)."""
    out: dict[str, Any] = {}
    if overall.get("n_mek_open_accuracy"):
        out["mek_open_acc_printed"] = overall["mek_open_accuracy"] / overall["n_mek_open_accuracy"]
    if getattr(protocol, "judge", None):
        out["judge"] = protocol.judge
    return out


def _spec(variant: _Variant) -> dict[str, Any]:
    name = f"medevalkit_{variant.key}"
    metrics = ("mek_accuracy",) if variant.key == "pmc_vqa" else VQA_METRICS
    register_prompt(name, lambda record, key=variant.key: (prompt_for(key, record), False))
    register_scorer(name, RowScorer(metrics, functools.partial(score_rows, variant.key), summary,
                                    judged=variant.key != "pmc_vqa"))
    return {"name": name, "item_metrics": metrics, "primary": "mek_accuracy", "closed_mode": "generate",
            "prompt": name, "scorer": name, "datasets": (variant.dataset,),
            "source": SOURCE.format(file=variant.file),
            "description": f"MedEvalKit {variant.title}: its prompt, every answer generated, its answer parsing and "
                           f"scoring ({variant.file} cal_metrics); LLM judge off unless judge= names one."}


#: keyword arguments of the registered protocols (``eval.protocols`` builds and registers them)
PROTOCOL_SPECS: tuple[dict[str, Any], ...] = tuple(_spec(v) for v in VARIANTS.values())

