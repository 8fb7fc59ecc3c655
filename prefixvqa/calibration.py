"""Confidence for every answer: temperature-scaled sequence likelihood, its calibration error, and abstention.

Raw confidence is what the model already computes:

* a generated answer: the geometric-mean token probability ``exp(l / n)``, where ``l`` is the answer's log-probability
  (its tokens up to and including EOS or the stop string) and ``n`` its token count;
* a scored answer (closed question, multiple choice): the winning candidate's probability under a softmax over the
  candidates' length-normalised log-likelihoods.

Temperature scaling (Guo et al. 2017) divides those log-likelihoods by one learned ``T`` per answering mode:
``exp(l / (n T))`` and ``softmax(ll / T)``. ``T`` is fitted on a validation set by minimising the negative
log-likelihood of "the answer was right" (binary cross-entropy between confidence and correctness). Being monotone,
it never changes which answer is given nor the order of confidences, only how far they can be trusted. The targets
are smoothed as in Platt scaling, so a validation set the model gets entirely right does not send T to zero. Expected
calibration error (ECE, 10 equal-width bins) before and after, a reliability diagram and the accuracy-coverage curve
(answer only above a threshold, "uncertain" otherwise) go into evaluation reports.

The fitted temperatures live in the adapter folder as ``calibration.json`` (listed in its sha256 manifest).

Abstention has one home here: :func:`abstention_threshold` says which threshold is in force (the caller's, else the
calibration's default), :func:`abstains` whether a confidence falls below it, and :func:`abstain` turns an answer
into "uncertain" keeping the guess. The model, `predict`, the CLI and the web app all ask these.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from .errors import PrefixVQAError
from .fileio import atomic_write, refuse_foreign

__all__ = ["CALIBRATION_NAME", "UNCERTAIN", "Calibration", "CalibrationError", "expected_calibration_error",
           "fit_temperature", "fit_calibration", "coverage_curve", "reliability_bins", "confidence_summary",
           "row_confidence", "plot_reliability", "plot_coverage", "is_correct", "CORRECT_AT", "check_threshold",
           "abstention_threshold", "abstains", "abstain"]

CALIBRATION_NAME = "calibration.json"
UNCERTAIN = "uncertain"  # the answer given instead of a guess below the abstention threshold
CORRECT_AT = 0.5  # an item counts as answered correctly when its primary per-item score reaches this
_LOG_T = [-4.0 + 0.1 * i for i in range(81)]  # coarse log-temperature grid: T from 0.018 to 55, refined below


class CalibrationError(PrefixVQAError, ValueError):
    """A calibration file or value (temperature, abstention threshold) is invalid; the message names it."""


def check_threshold(value: float, what: str = "threshold") -> float:
    """``value`` if it is a confidence in [0, 1]; else a CalibrationError naming ``what`` (the caller's name for it,
    such as ``--abstain-below``), so every entry point refuses the same values with the same words."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise CalibrationError(f"{what} must be a confidence in [0, 1], got {value!r}")
    return float(value)


def abstention_threshold(threshold: float | None, calibration: "Calibration | None",
                         what: str = "abstain_below") -> float | None:
    """The abstention threshold in force: the caller's (checked; ``what`` names it in the error), else the
    calibration's default, else none. The one rule behind ``abstain_below`` in `predict`, the CLI and the web app."""
    if threshold is not None:
        return check_threshold(threshold, what)
    return calibration.threshold if calibration is not None else None


def abstains(confidence: float | None, threshold: float | None, ood: bool = False) -> bool:
    """Whether an answer of this confidence is withheld ("uncertain") under ``threshold``; an answer without a
    confidence, or no threshold, never abstains. With a threshold in force, an answer about an image unlike the
    adapter's training images (``ood``, see `prefixvqa.ood`) is withheld whatever its confidence."""
    return threshold is not None and (ood or (confidence is not None and confidence < threshold))


_A = TypeVar("_A")


def abstain(answer: _A, threshold: float | None) -> _A:
    """The answer, or a copy saying "uncertain" (its text kept as ``guess``, ``abstained`` set) when its confidence
    is below ``threshold`` (or its image is flagged out of distribution). Works on any dataclass with ``text``,
    ``confidence``, ``abstained`` and ``guess`` (`model.Answer`), so this module needs no import of the model."""
    if not abstains(answer.confidence, threshold, getattr(answer, "ood", False)):  # type: ignore[attr-defined]
        return answer
    return dataclasses.replace(answer, text=UNCERTAIN, abstained=True, guess=answer.text)  # type: ignore


def is_correct(primary_score: float | None) -> bool:
    """Correctness of one item from its protocol's primary per-item score (binary for most protocols; LLaVA-Med's
    open recall counts from one half, the rule the confidence histogram already used)."""
    return primary_score is not None and primary_score >= CORRECT_AT


def _softmax_max(values: Sequence[float], t: float) -> float:
    top = max(values)
    z = sum(math.exp((v - top) / t) for v in values)
    return 1.0 / z


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


@dataclass
class Calibration:
    """Temperatures for generated and scored answers, an optional default abstention threshold, and provenance."""

    temperature_generate: float = 1.0
    temperature_score: float = 1.0
    threshold: float | None = None  # answers below it are "uncertain" unless the caller sets another
    fitted_on: dict[str, Any] = field(default_factory=dict)  # items, content hash, ECE before/after there
    #: ids of the records it was fitted on, in memory only (never saved, not compared): lets `evaluate` refuse to
    #: report calibration on the very items the temperatures were fitted to
    fitted_ids: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("temperature_generate", "temperature_score"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CalibrationError(f"{CALIBRATION_NAME}: {name} must be a positive number, got {value!r}")
        if self.threshold is not None:
            check_threshold(self.threshold, f"{CALIBRATION_NAME}: threshold")

    def with_threshold(self, threshold: float | None) -> "Calibration":
        """The same temperatures (and provenance) with another default abstention threshold; unchanged for None.
        What ``--abstain-below`` applies to an adapter's calibration (or to the identity one)."""
        return self if threshold is None else dataclasses.replace(self, threshold=check_threshold(threshold))

    # --- confidences --------------------------------------------------------------------------------------------
    def generated(self, logprob: float, num_tokens: int) -> float:
        """exp(mean token log-probability / T) of a generated answer."""
        return math.exp(logprob / max(num_tokens, 1) / self.temperature_generate)

    def scored(self, logliks: Sequence[float]) -> list[float]:
        """softmax(length-normalised candidate log-likelihoods / T)."""
        top = max(logliks)
        e = [math.exp((v - top) / self.temperature_score) for v in logliks]
        s = sum(e)
        return [x / s for x in e]

    # --- file ---------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``calibration.json`` into an adapter folder (atomically; the caller re-manifests the folder). A file
        of that name that is not a calibration is refused (`fileio.OverwriteRefused`), never replaced.
        The in-memory ``fitted_ids`` stay out: the file carries provenance, not the validation set."""
        data = asdict(self)
        data.pop("fitted_ids")
        path = Path(folder) / CALIBRATION_NAME
        refuse_foreign(path, _is_calibration, "a calibration prefixvqa wrote", file=True)
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Calibration | None":
        """The folder's calibration, or None when it has none (an uncalibrated adapter is not an error); a file
        that is not a calibration raises CalibrationError naming it."""
        path = Path(folder) / CALIBRATION_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CalibrationError(f"{path}: not a calibration file: {exc}") from None


def _is_calibration(path: Path) -> bool:
    """The proof that ``path`` may be replaced: a calibration file a save wrote (it loads, and names its temperature)."""
    try:
        return Calibration.load(path.parent) is not None and '"temperature_generate"' in path.read_text()
    except (CalibrationError, OSError, UnicodeDecodeError):
        return False


def row_confidence(row: Mapping[str, Any], calibration: Calibration | None) -> float | None:
    """Confidence of one predictions.jsonl row (raw with ``calibration=None``), recomputed from what the row stores:
    the candidate probabilities of a scored answer (softmax is shift-invariant, so their logs serve as
    log-likelihoods), or the log-probability and token count of a generated one."""
    cal = calibration or Calibration()
    if row.get("mode") == "score" and row.get("choice_probs"):
        probs = [max(float(p), 1e-300) for p in row["choice_probs"]]
        return max(cal.scored([math.log(p) for p in probs]))
    if row.get("mode") == "generate" and row.get("score") is not None:
        return cal.generated(float(row["score"]), int(row.get("num_tokens") or 1))
    return None


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the item-weighted mean |accuracy - mean confidence| over equal-width confidence bins."""
    if len(confidences) != len(correct):
        raise CalibrationError("confidences and correct differ in length")
    if not confidences:
        return float("nan")
    return sum(abs(b["accuracy"] - b["confidence"]) * b["n"] for b in reliability_bins(confidences, correct, bins)
               ) / len(confidences)


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """Per non-empty bin: lower edge, item count, mean confidence, accuracy (the reliability diagram's bars)."""
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidences, correct):
        groups.setdefault(min(int(c * bins), bins - 1), []).append((c, bool(ok)))
    return [{"low": k / bins, "n": len(v), "confidence": sum(c for c, _ in v) / len(v),
             "accuracy": sum(ok for _, ok in v) / len(v)} for k, v in sorted(groups.items())]


def fit_temperature(values: Sequence[Any], correct: Sequence[bool], confidence: Any) -> float:
    """The T that minimises the binary cross-entropy of ``confidence(value, T)`` against correctness, searched on a
    log-spaced grid (T from 0.018 to 55) and refined around the best point to 0.5 % steps. A grid keeps the fit
    deterministic and free of optimiser settings.

    The targets are Platt's (1999) smoothed ones, (N+ + 1) / (N+ + 2) for right answers and 1 / (N- + 2) for wrong
    ones: with plain 0/1 targets a validation set without a single error drives T to zero (every confidence 1.0)."""
    if not values:
        return 1.0
    n_pos = sum(map(bool, correct))
    t_pos, t_neg = (n_pos + 1) / (n_pos + 2), 1 / (len(correct) - n_pos + 2)

    def nll(t: float) -> float:
        total = 0.0
        for v, ok in zip(values, correct):
            p = min(max(confidence(v, t), 1e-12), 1 - 1e-12)
            target = t_pos if ok else t_neg
            total -= target * math.log(p) + (1 - target) * math.log(1 - p)
        return total

    coarse = min(_LOG_T, key=lambda lt: nll(math.exp(lt)))
    fine = [coarse + 0.005 * k for k in range(-20, 21)]
    return math.exp(min(fine, key=lambda lt: nll(math.exp(lt))))


def fit_calibration(rows: Sequence[Mapping[str, Any]], correct: Sequence[bool], *, threshold: float | None = None,
                    provenance: Mapping[str, Any] | None = None) -> Calibration:
    """Temperatures from validation predictions (rows of predictions.jsonl) and their correctness, per mode.
    Rows with an ``id`` are remembered (``fitted_ids``) so evaluation can refuse to report on them."""
    gen = [(float(r["score"]), int(r.get("num_tokens") or 1), ok) for r, ok in zip(rows, correct)
           if r.get("mode") == "generate" and r.get("score") is not None]
    sco = [([math.log(max(float(p), 1e-300)) for p in r["choice_probs"]], ok) for r, ok in zip(rows, correct)
           if r.get("mode") == "score" and r.get("choice_probs")]
    t_gen = fit_temperature([(s, n) for s, n, _ in gen], [ok for *_, ok in gen],
                            lambda v, t: math.exp(v[0] / max(v[1], 1) / t))
    t_sco = fit_temperature([ll for ll, _ in sco], [ok for _, ok in sco], lambda v, t: _softmax_max(v, t))
    cal = Calibration(temperature_generate=t_gen, temperature_score=t_sco, threshold=threshold,
                      fitted_ids=frozenset(str(r["id"]) for r in rows if r.get("id") is not None))
    raw = [row_confidence(r, None) for r in rows]
    fitted = [row_confidence(r, cal) for r in rows]
    keep = [i for i, c in enumerate(raw) if c is not None]
    cal.fitted_on = {**dict(provenance or {}), "items": len(keep), "generated": len(gen), "scored": len(sco),
                     "ece_before": expected_calibration_error([raw[i] for i in keep], [correct[i] for i in keep]),
                     "ece_after": expected_calibration_error([fitted[i] for i in keep], [correct[i] for i in keep])}
    return cal


def coverage_curve(confidences: Sequence[float], correct: Sequence[bool]) -> list[dict[str, float]]:
    """Answer only the most confident items: for each cut (one per distinct confidence, highest first), the
    threshold, the share of items answered (coverage) and the accuracy on the answered ones."""
    order = sorted(range(len(confidences)), key=lambda i: -confidences[i])
    out, right = [], 0
    for k, i in enumerate(order, 1):
        right += bool(correct[i])
        if k == len(order) or confidences[order[k]] < confidences[i]:
            out.append({"threshold": confidences[i], "coverage": k / len(order), "accuracy": right / k})
    return out


def confidence_summary(confidences_raw: Sequence[float], confidences: Sequence[float], correct: Sequence[bool],
                       calibration: Calibration | None) -> dict[str, Any]:
    """What metrics.json and report.md say about confidence: ECE raw and calibrated, accuracy at coverage levels and
    at the calibration's threshold."""
    if not correct:
        return {}
    curve = coverage_curve(list(confidences), list(correct))
    at_cov = {}
    for level in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        point = next((p for p in curve if p["coverage"] >= level - 1e-9), curve[-1])
        at_cov[f"{level:.1f}"] = {"threshold": point["threshold"], "coverage": point["coverage"],
                                  "accuracy": point["accuracy"]}
    out: dict[str, Any] = {"n": len(correct), "accuracy": sum(map(bool, correct)) / len(correct),
                           "ece_raw": expected_calibration_error(confidences_raw, correct),
                           "accuracy_at_coverage": at_cov}
    if calibration is not None:
        out["ece_calibrated"] = expected_calibration_error(confidences, correct)
        out["temperature_generate"] = calibration.temperature_generate
        out["temperature_score"] = calibration.temperature_score
        if calibration.threshold is not None:
            answered = [ok for c, ok in zip(confidences, correct) if c >= calibration.threshold]
            out["abstain_below"] = calibration.threshold
            out["coverage_at_threshold"] = len(answered) / len(correct)
            out["accuracy_answered_at_threshold"] = sum(answered) / len(answered) if answered else None
    return out


def _figure(width: float = 4.2, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_reliability(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[bool]]],
                     save: Any, bins: int = 10) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, one marked line per series (raw, calibrated),
    the diagonal for perfect calibration, ECE in the legend. ``save(fig, path)`` writes it (atomically)."""
    fig = _figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for (label, (conf, ok)), colour in zip(series.items(), ("tab:red", "tab:blue", "tab:green")):
        b = reliability_bins(conf, ok, bins)
        ece = expected_calibration_error(conf, ok, bins)
        ax.plot([x["confidence"] for x in b], [x["accuracy"] for x in b], marker="o", color=colour,
                label=f"{label} (ECE {ece:.3f})")
        for x in b:
            ax.annotate(str(x["n"]), (x["confidence"], x["accuracy"]), fontsize=6, color=colour,
                        textcoords="offset points", xytext=(3, -8))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (numbers: items per bin)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    save(fig, Path(path))


def plot_coverage(path: str | Path, confidences: Sequence[float], correct: Sequence[bool], save: Any) -> None:
    """Accuracy on the answered items against coverage when abstaining below a moving threshold."""
    curve = coverage_curve(confidences, correct)
    fig = _figure(4.2, 3.2)
    ax = fig.subplots()
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], marker=".", color="tab:blue")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("accuracy on answered items")
    ax.set_title("abstaining below a confidence threshold", fontsize=9)
    save(fig, Path(path))
