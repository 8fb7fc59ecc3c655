"""Where every metric comes from: the source code it equals (repository, commit, file), or prefixvqa's corrected
definition and what that corrects.

:data:`METRIC_SOURCES` holds one :class:`MetricSource` per metric name the protocols report. metrics.json carries
:func:`metric_sources` (each metric's source and the settings its value depends on), and the README's protocol table
is :func:`protocols_table` (a test keeps the two equal). A protocol family added later registers its metrics here
with :func:`register_metric_source` and its rows appear in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Source", "MetricSource", "METRIC_SOURCES", "register_metric_source", "metric_sources",
           "protocols_table", "PREFIXVQA"]


@dataclass(frozen=True)
class Source:
    """A piece of evaluation code: repository, commit (or tag) and the files that define the metric."""

    repository: str
    commit: str
    files: tuple[str, ...]

    def cite(self) -> str:
        """"repository @ commit: file; file", the form the README tables use."""
        return f"{self.repository} @ {self.commit}: " + "; ".join(self.files)


@dataclass(frozen=True)
class MetricSource:
    """One metric's provenance.

    ``upstream``: True when the metric equals ``source``'s numbers on the same predictions; False for prefixvqa's
    own definitions. ``function``: the dotted path of the function that implements it (its docstring names the
    source). ``corrects``: {upstream metric name: what this metric changes and why}. ``settings``: the protocol
    fields its value depends on (recorded beside it in metrics.json).
    """

    source: Source
    upstream: bool
    function: str
    corrects: Mapping[str, str] = field(default_factory=dict)
    settings: tuple[str, ...] = ()

    def describe(self, protocol: Any) -> dict[str, Any]:
        """The JSON-able record metrics.json keeps for this metric under ``protocol``."""
        return {"source": self.source.cite(), "equals_upstream": self.upstream, "function": self.function,
                "settings": {name: getattr(protocol, name) for name in self.settings}}


PREFIXVQA = Source("prefixvqa", "this release", ("prefixvqa/eval/metrics.py",))
LLAVA_MED = Source("microsoft/LLaVA-Med", "b9a98a7 (tag v1.0.0)",
                   ("llava/eval/run_eval.py", "llava/eval/eval_metrics/evaluate_metrics.py",
                    "llava/eval/eval_metrics/glossary.py"))
LLAVA_MED_PRE35 = Source("microsoft/LLaVA-Med", "e9972cf (before the fix of issue #35)",
                         ("llava/eval/run_eval.py", "llava/eval/eval_metrics/glossary.py"))
LLAVA_RAD = Source("microsoft/LLaVA-Rad", "1fc4409",
                   ("llava/eval/rrg_eval/run.py", "llava/eval/rrg_eval/rrg_eval/rouge.py"))
VAN_SONSBEEK = Source("tjvsonsbeek/open-ended-medical-vqa", "c605aeb", ("predict.py",))

_M, _U, _B = "prefixvqa.eval.metrics.", "prefixvqa.eval.upstream.", "prefixvqa.eval.bertscore."
_PROTO = "prefixvqa.eval.protocols."
_FOLD = ("Normalisation: NFKC, lower-case, apostrophes and all punctuation removed, articles dropped, number words "
         "to digits up to thousands; 'none' stays 'none' (upstream maps it to '0').")

METRIC_SOURCES: dict[str, MetricSource] = {
    # ---------------------------------------------------------------------------------------------- LLaVA-Med
    "closed_accuracy_llava_med": MetricSource(LLAVA_MED, True, _U + "llava_med_closed", corrects={
        "closed_accuracy_llava_med_pre35": "Every closed item counts in the denominator (upstream's fix of #35)."}),
    "closed_accuracy_llava_med_pre35": MetricSource(LLAVA_MED_PRE35, True, _U + "llava_med_closed_pre35"),
    "open_recall_llava_med": MetricSource(LLAVA_MED, True, _U + "llava_med_open_recall"),
    "closed_accuracy_strict": MetricSource(PREFIXVQA, False, _M + "closed_match", corrects={
        "closed_accuracy_llava_med": "A yes/no gold must lead the answer; any other gold must equal it. Upstream "
        "counts an item only if the prediction contains 'yes' or 'no' anywhere, so ('left', 'left') and ('male', "
        "'male') score 0, and it tests character containment, so gold 'no' matches 'normal' and 'unknown'. " + _FOLD}),
    "closed_accuracy_substring": MetricSource(PREFIXVQA, False, _M + "closed_match"),
    "open_recall": MetricSource(PREFIXVQA, False, _M + "open_recall", corrects={
        "open_recall_llava_med": "Each gold word counts once, found or not; upstream counts a found word as often "
        "as the prediction repeats it ('lung lung lung' for 'left lung': 0.75, here 0.5). " + _FOLD}),
    "llava_primary": MetricSource(PREFIXVQA, False, _PROTO + "_llava_primary"),
    # ------------------------------------------------------------------------------------ van Sonsbeek et al.
    "exact_match_upstream": MetricSource(VAN_SONSBEEK, True, _M + "exact_match_upstream"),
    "char_bleu1_upstream": MetricSource(VAN_SONSBEEK, True, _M + "char_bleu1_upstream"),
    "token_f1_upstream": MetricSource(VAN_SONSBEEK, True, _U + "gpt2_token_f1", settings=("f1_tokenizer",)),
    "bertscore_f1_upstream": MetricSource(VAN_SONSBEEK, True, _B + "bertscore",
                                          settings=("bertscore_model", "bertscore_layer")),
    "exact_match": MetricSource(PREFIXVQA, False, _M + "exact_match", corrects={
        "exact_match_upstream": "Answers are compared after normalisation (upstream: lower-casing only, so 'yes.' "
        "misses 'yes')."}),
    "bleu1": MetricSource(PREFIXVQA, False, _M + "sentence_bleu", corrects={
        "char_bleu1_upstream": "BLEU-1 on words; upstream's nltk call on strings scored characters ('no' against "
        "'normal': 1.0).",
        "bleu1_llava_rad": "Corpus BLEU-1 on prefixvqa word tokens (lower-cased, punctuation dropped, CJK per "
        "character), no smoothing, percentile bootstrap interval over items; upstream: sacrebleu 13a tokens, cased, "
        "punctuation kept, exponential smoothing, sacrebleu's own interval."}),
    "bleu4": MetricSource(PREFIXVQA, False, _M + "bleu", corrects={
        "bleu4_llava_rad": "As for BLEU-1: prefixvqa word tokens, no smoothing, percentile bootstrap; upstream "
        "scores case and punctuation ('NO ACUTE ...' against 'No acute ...': 0.107 upstream, 1.0 here)."}),
    "token_f1": MetricSource(PREFIXVQA, False, _M + "token_f1", corrects={
        "token_f1_upstream": "F1 on normalised words, the same for every decoder; upstream counted GPT-2 token ids "
        "of the raw strings."}),
    "bert_f1": MetricSource(PREFIXVQA, False, _M + "bert_similarity", settings=("bert_model_path", "bert_layer"),
                            corrects={"bertscore_f1_upstream": "Special tokens are not match candidates and the "
                                      "encoder is a local one (default all-MiniLM-L6-v2's last layer, offline); "
                                      "upstream: bert-base-uncased layer 9, [CLS]/[SEP] matchable."}),
    # ---------------------------------------------------------------------------------------------- LLaVA-Rad
    "bleu1_llava_rad": MetricSource(LLAVA_RAD, True, _U + "llava_rad_bleu"),
    "bleu4_llava_rad": MetricSource(LLAVA_RAD, True, _U + "llava_rad_bleu"),
    "rouge_l_llava_rad": MetricSource(LLAVA_RAD, True, _U + "llava_rad_rouge_l"),
    "rouge_l": MetricSource(PREFIXVQA, False, _M + "rouge_l", corrects={
        "rouge_l_llava_rad": "The mean of the per-item F with a percentile bootstrap interval; upstream reports the "
        "median of 500 bootstrap means. Tokens keep CJK characters (rouge-score's tokeniser drops them)."}),
    # -------------------------------------------------------------------------------------- other prefixvqa
    "mc_accuracy": MetricSource(PREFIXVQA, False, _PROTO + "_mc_accuracy"),
    "bleu2": MetricSource(PREFIXVQA, False, _M + "bleu"),
    "bleu3": MetricSource(PREFIXVQA, False, _M + "bleu"),
}

# ------------------------------------------------------------------------------------- toolkit protocol families
def _toolkit_sources() -> dict[str, MetricSource]:
    """MedEvalKit's and lmms-eval's metrics: each equals its toolkit's scoring code at the commit its module names."""
    from . import lmms_eval, medevalkit

    mek = Source(medevalkit.REPO, medevalkit.COMMIT[:7], ("utils/question_formats.py", "utils/utils.py",
                                                           *(f"utils/{v.file}" for v in medevalkit.VARIANTS.values())))
    lmms = Source(lmms_eval.REPO, lmms_eval.COMMIT[:7], ("lmms_eval/tasks/slake/utils.py",
                                                        "lmms_eval/tasks/slake/_default_template_yaml"))
    return {**{name: MetricSource(mek, True, "prefixvqa.eval.medevalkit.score_rows")
               for name in (*medevalkit.VQA_METRICS, "mek_open_acc_printed")},
            **{name: MetricSource(lmms, True, "prefixvqa.eval.lmms_eval.score_rows") for name in lmms_eval.METRICS}}


METRIC_SOURCES.update(_toolkit_sources())


def register_metric_source(name: str, source: MetricSource, *, overwrite: bool = False) -> MetricSource:
    """Record where metric ``name`` comes from (protocol families added later call this); no silent replacement."""
    if name in METRIC_SOURCES and not overwrite:
        raise ValueError(f"metric {name!r} already has a source (pass overwrite=True)")
    METRIC_SOURCES[name] = source
    return source


def _protocol_metrics(protocol: Any) -> list[str]:
    """Every metric a protocol can report: its item metrics, its opt-in upstream variants, its corpus metrics."""
    from .protocols import UPSTREAM_VARIANTS

    names = (*protocol.item_metrics, *protocol.upstream_metrics, *UPSTREAM_VARIANTS.get(protocol.name, ()),
             protocol.primary, *protocol.corpus_metrics)
    return list(dict.fromkeys(names))


def metric_sources(protocol: Any) -> dict[str, dict[str, Any]]:
    """metrics.json's "sources": for every metric the protocol reports, its source and the settings it used."""
    reported = (*protocol.all_item_metrics, *protocol.corpus_metrics)
    return {name: METRIC_SOURCES[name].describe(protocol) for name in dict.fromkeys(reported)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def protocols_table() -> str:
    """The README's table: per protocol, each upstream metric with its source file @ commit, the corrected variant
    beside it and what that changes and why; then the protocol's metrics that no upstream code defines."""
    from .protocols import PROTOCOLS

    rows = ["| protocol | upstream metric (equals its code) | source (repository @ commit: files) | corrected "
            "variant | what the corrected variant changes and why |", "|---|---|---|---|---|"]
    for pname in sorted(PROTOCOLS):
        names = _protocol_metrics(PROTOCOLS[pname])
        covered: set[str] = set()
        plain: dict[Source, list[str]] = {}  # upstream metrics nothing corrects: one row per source
        for name in names:
            src = METRIC_SOURCES[name]
            if not src.upstream:
                continue
            fixes = [(other, METRIC_SOURCES[other].corrects[name]) for other in names
                     if name in METRIC_SOURCES[other].corrects]
            if not fixes:
                plain.setdefault(src.source, []).append(name)
                continue
            covered.update(other for other, _ in fixes)
            rows.append("| " + " | ".join(_cell(c) for c in (
                f"`{pname}`", f"`{name}`", src.source.cite(), ", ".join(f"`{o}`" for o, _ in fixes),
                " ".join(why for _, why in fixes))) + " |")
        for source, group in plain.items():
            rows.append(f"| `{pname}` | " + ", ".join(f"`{n}`" for n in group) + f" | {_cell(source.cite())} | - | "
                        "- |")
        own = [n for n in names if not METRIC_SOURCES[n].upstream and n not in covered]
        if own:
            rows.append(f"| `{pname}` | - | {_cell(PREFIXVQA.cite())} | " + ", ".join(f"`{n}`" for n in own)
                        + " | prefixvqa's own definitions (no upstream scoring code to equal) |")
    return "\n".join(rows)
