"""Say when an image is unlike the images an adapter was trained on: a summary of the training images' encoder
features, a distance to it, and a threshold.

Temperature scaling is fitted on data from the training distribution, so a confident answer about an image of another
modality, site or scanner looks as trustworthy as any other. This module adds a signal that does not depend on the
answer: how far the image's encoder features lie from the training images'.

* **Summary** (`ImageSummary`, saved as ``image_summary.safetensors`` in the adapter folder, listed in its manifest):
  the encoder features of each distinct training image, mean-pooled over its tokens (patches), summarised by a
  statistic from `STATISTICS`: ``mahalanobis`` (default: mean, the top principal components with their variances
  and one variance for the rest, i.e. a probabilistic-PCA Gaussian; the score is the Mahalanobis distance under it)
  or ``kmeans`` (k-means centroids of the L2-normalised features; the score is the cosine distance to the nearest).
  Measured in benchmarks/bench_ood.py (README "Out-of-distribution images").
* **Threshold**: the ``quantile`` (0.95: 95 % pass) of the scores of held-out in-distribution images: the run's
  evaluation images when they are other images than the training ones, else a fixed fifth of the training images
  held out of the fit. ``eval --calibrate-on`` refits it on its validation images, beside the temperatures.
* **Report**: every answer (`generation.Answer`, predictions rows, `score_choices`' rows, the app) carries
  ``ood_score`` and ``ood`` (score above the threshold) and, when flagged, the plain warning `OOD_WARNING`. An
  abstention threshold in force (``--abstain-below``) also withholds flagged answers (`calibration.abstains`).

The features are the frozen or trained encoder's as saved: the summary records the encoder key (`data.cache.encoder_key`)
it was computed with, and the trainer recomputes it whenever a checkpoint's encoder differs (a trained tower).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence, get_args

import torch

from .errors import PrefixVQAError

if TYPE_CHECKING:
    from .data.cache import FeatureCache
    from .data.records import VQARecord
    from .model import MedVQAAdapter

__all__ = ["SUMMARY_NAME", "OOD_WARNING", "STATISTICS", "Statistic", "ImageSummary", "OODError", "pool",
           "fit_summary", "image_features", "summarize_training_images", "attach_training_images",
           "summary_for_save", "encode_batch", "row_scores", "report", "reported", "auroc", "DEFAULT_QUANTILE",
           "quantile_threshold", "warning_line", "refit_threshold", "flagged_summary", "report_section",
           "features_report"]

log = logging.getLogger(__name__)

SUMMARY_NAME = "image_summary.safetensors"
OOD_WARNING = "unlike the images this adapter was trained on"
DEFAULT_QUANTILE = 0.95  # share of held-out in-distribution images that pass the threshold
MAX_IMAGES = 4096  # distinct training images summarised at most (a deterministic sample beyond)
HELD_OUT_SHARE = 0.2  # of the training images, held out of the fit to set the threshold when no eval images serve
MIN_HELD_OUT = 10  # fewer held-out images than this: no threshold (scores only)
StatisticName = Literal["mahalanobis", "kmeans"]


class OODError(PrefixVQAError, ValueError):
    """An image summary cannot be fitted, read or applied (damaged file, wrong feature width); the message says
    which file or value."""


def pool(features: torch.Tensor) -> torch.Tensor:
    """(I, N, D) encoder features (or (I, D)) -> (I, D) in float64: the mean over an image's tokens."""
    x = features.detach().to("cpu", torch.float64)
    return x.mean(1) if x.dim() == 3 else x


# --- statistics ------------------------------------------------------------------------------------------------------
class Statistic:
    """One way of summarising pooled features and scoring new ones against the summary (a registry entry)."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]  # the tensors its summary holds

    def fit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The summary tensors of pooled training features ``x`` (n, D)."""
        raise NotImplementedError

    def score(self, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(n,) distances of pooled features ``x`` (n, D) from the summary: larger means less like training."""
        raise NotImplementedError

    def width(self, tensors: dict[str, torch.Tensor]) -> int:
        """The feature width D the summary was fitted on."""
        return int(tensors[self.keys[0]].shape[-1])


class Mahalanobis(Statistic):
    """Probabilistic PCA: mean, the top ``k`` principal directions with their variances, and the mean variance of the
    remaining directions (floored), so the covariance is full rank with k * D numbers. Score: the Mahalanobis
    distance, sqrt(sum_i p_i^2 / l_i + |residual|^2 / s^2)."""

    name = "mahalanobis"
    keys = ("mean", "components", "variances", "residual_variance")
    max_components = 64

    def fit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean, top components and variances of ``x`` (at least two rows)."""
        n, d = x.shape
        mean = x.mean(0)
        xc = x - mean
        _, s, vt = torch.linalg.svd(xc, full_matrices=False)
        var = s ** 2 / max(n - 1, 1)
        total = float((xc ** 2).sum() / max(n - 1, 1))
        k = max(1, min(self.max_components, n // 4, d - 1 if d > 1 else 1, int((var > 1e-12 * var[0]).sum())))
        rest = max(total - float(var[:k].sum()), 0.0) / max(d - k, 1)
        floor = 1e-6 * max(total / d, 1e-30)  # keeps a degenerate set (identical images) finite
        return {"mean": mean.float(), "components": vt[:k].float(),
                "variances": var[:k].clamp(min=floor).float(),
                "residual_variance": torch.tensor([max(rest, floor)], dtype=torch.float32)}

    def score(self, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance under the PPCA Gaussian."""
        xc = x - tensors["mean"].double()
        p = xc @ tensors["components"].double().T
        resid = (xc ** 2).sum(1) - (p ** 2).sum(1)
        d2 = (p ** 2 / tensors["variances"].double()).sum(1) + resid.clamp(min=0) / tensors["residual_variance"].double()
        return d2.sqrt()


class KMeans(Statistic):
    """k-means centroids of the L2-normalised features (k-means++ start, fixed seed, 30 Lloyd steps). Score: cosine
    distance to the nearest centroid."""

    name = "kmeans"
    keys = ("centroids",)
    max_centroids = 32

    def fit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Centroids of ``x`` (n, D): at most one per four images, at least one."""
        z = torch.nn.functional.normalize(x, dim=1)
        k = max(1, min(self.max_centroids, len(z) // 4))
        gen = torch.Generator().manual_seed(0)
        centres = z[torch.randint(len(z), (1,), generator=gen)]
        while len(centres) < k:  # k-means++: next centre drawn in proportion to the squared distance
            d = (1 - z @ centres.T).min(1).values
            w = d.clamp(min=0) ** 2
            pick = torch.multinomial(w / w.sum(), 1, generator=gen) if float(w.sum()) > 0 else torch.tensor([0])
            centres = torch.cat([centres, z[pick]])
        for _ in range(30):
            owner = (z @ centres.T).argmax(1)
            centres = torch.stack([torch.nn.functional.normalize(z[owner == j].mean(0), dim=0)
                                   if bool((owner == j).any()) else centres[j] for j in range(k)])
        return {"centroids": centres.float()}

    def score(self, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """1 - the cosine similarity to the nearest centroid."""
        z = torch.nn.functional.normalize(x, dim=1)
        return 1 - (z @ tensors["centroids"].double().T).max(1).values


STATISTICS: dict[str, Statistic] = {s.name: s for s in (Mahalanobis(), KMeans())}
assert set(STATISTICS) == set(get_args(StatisticName))


# --- the summary -------------------------------------------------------------------------------------------------
@dataclass
class ImageSummary:
    """The training images' feature summary, its threshold and provenance: what ``image_summary.safetensors`` holds
    (tensors, and the rest as JSON in the file's metadata)."""

    statistic: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    threshold: float | None = None  # scores above it are flagged; None: too few held-out images to fit one
    quantile: float = DEFAULT_QUANTILE
    encoder_key: str = ""  # `data.cache.encoder_key` of the encoder the features came from
    fitted_on: dict[str, Any] = field(default_factory=dict)  # images, held-out images and where they came from

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise OODError(f"{SUMMARY_NAME}: statistic {self.statistic!r} is not one of {sorted(STATISTICS)}")
        want = STATISTICS[self.statistic].keys
        if set(self.tensors) != set(want):
            raise OODError(f"{SUMMARY_NAME}: statistic {self.statistic!r} needs tensors {sorted(want)}, the file "
                           f"holds {sorted(self.tensors)}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold)):
            raise OODError(f"{SUMMARY_NAME}: threshold must be a finite number, got {self.threshold!r}")

    @property
    def width(self) -> int:
        """The feature width D the summary expects."""
        return STATISTICS[self.statistic].width(self.tensors)

    def score(self, features: torch.Tensor) -> list[float]:
        """One score per image of (I, N, D) encoder features (or (I, D) pooled ones): larger is less like training."""
        x = pool(features)
        if x.shape[-1] != self.width:
            raise OODError(f"{SUMMARY_NAME}: fitted on {self.width}-wide features, the encoder gives {x.shape[-1]}")
        return [float(v) for v in STATISTICS[self.statistic].score(self.tensors, x)]

    def flagged(self, score: float | None) -> bool:
        """Whether a score lies above the threshold (never without a threshold or a score)."""
        return self.threshold is not None and score is not None and score > self.threshold

    def with_threshold(self, held_out_scores: Sequence[float], where: str = "", quantile: float | None = None
                       ) -> "ImageSummary":
        """The same summary with its threshold refitted: the ``quantile`` of scores of held-out in-distribution
        images (``where`` says which, for the provenance)."""
        q = self.quantile if quantile is None else quantile
        threshold = quantile_threshold(held_out_scores, q)
        return dataclasses.replace(self, threshold=threshold, quantile=q,
                                   fitted_on={**self.fitted_on, "held_out": len(held_out_scores),
                                              "held_out_from": where})

    # --- file ------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``image_summary.safetensors`` into an adapter folder (the caller writes the manifest)."""
        from .fileio import save_safetensors

        meta = {"statistic": self.statistic, "threshold": self.threshold, "quantile": self.quantile,
                "encoder_key": self.encoder_key, "fitted_on": self.fitted_on}
        path = Path(folder) / SUMMARY_NAME
        save_safetensors({k: v.contiguous() for k, v in self.tensors.items()}, path,
                         metadata={"format": "pt", "library": "prefixvqa", "summary": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ImageSummary | None":
        """The folder's summary, or None when it has none (adapters saved before summaries existed); a file that is
        not a summary raises OODError naming it."""
        from safetensors import safe_open

        path = Path(folder) / SUMMARY_NAME
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["summary"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            return cls(meta["statistic"], tensors, meta.get("threshold"), float(meta.get("quantile", DEFAULT_QUANTILE)),
                       str(meta.get("encoder_key", "")), dict(meta.get("fitted_on") or {}))
        except OODError as exc:
            raise OODError(f"{path}: {exc}") from None
        except Exception as exc:  # safetensors' own errors, a missing or damaged metadata entry
            raise OODError(f"{path} is not an image summary: {exc.__class__.__name__}: {exc}") from None


def quantile_threshold(scores: Sequence[float], q: float) -> float | None:
    """The smallest score at or above which a share ``q`` of ``scores`` lies (None with fewer than MIN_HELD_OUT)."""
    if not 0 < q <= 1:
        raise OODError(f"quantile must lie in (0, 1], got {q!r}")
    if len(scores) < MIN_HELD_OUT:
        return None
    ordered = sorted(scores)
    return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])


def fit_summary(features: torch.Tensor, held_out: torch.Tensor | None = None, *,
                statistic: StatisticName = "mahalanobis", quantile: float = DEFAULT_QUANTILE, encoder_key: str = "",
                provenance: dict[str, Any] | None = None) -> ImageSummary:
    """A summary of training-image ``features`` ((n, N, D) or pooled (n, D), n >= 2), its threshold fitted on the
    ``held_out`` in-distribution images' features (none: no threshold)."""
    if statistic not in STATISTICS:
        raise OODError(f"statistic {statistic!r} is not one of {sorted(STATISTICS)}")
    x = pool(features)
    if len(x) < 2:
        raise OODError(f"an image summary needs at least 2 training images, got {len(x)}")
    stat = STATISTICS[statistic]
    summary = ImageSummary(statistic, stat.fit(x), None, quantile, encoder_key,
                           {**(provenance or {}), "images": len(x), "width": int(x.shape[-1])})
    if held_out is not None and len(held_out):
        summary = summary.with_threshold(summary.score(held_out), summary.fitted_on.get("held_out_from", "held out"))
    return summary


def auroc(inside: Sequence[float], outside: Sequence[float]) -> float:
    """Area under the ROC curve of a score that should be larger ``outside`` than ``inside``: the probability that a
    random outside image scores above a random inside one (ties count one half)."""
    if not inside or not outside:
        return float("nan")
    wins = sum((o > i) + 0.5 * (o == i) for o in outside for i in inside)
    return wins / (len(inside) * len(outside))


# --- training images ---------------------------------------------------------------------------------------------
def _image_id(record: "VQARecord") -> str:
    from .data.processor import image_key, view_args

    return image_key(record.image, view_args(record))


def _distinct(records: Sequence["VQARecord"]) -> dict[str, "VQARecord"]:
    out: dict[str, "VQARecord"] = {}
    for r in records:
        if r.image is not None:
            out.setdefault(_image_id(r), r)
    return out


def _held_out(key: str) -> bool:
    """A fixed fifth of the images (by a hash of their key): the same split in every run."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HELD_OUT_SHARE


@torch.no_grad()
def image_features(model: "MedVQAAdapter", records: Sequence["VQARecord"], cache: "FeatureCache | None" = None,
                   batch_size: int = 32) -> torch.Tensor:
    """(I, N, D) encoder features of the records' images (one row per record given; unreadable images are left
    out): read from ``cache`` when given, else encoded in eval mode without gradients."""
    from .data.images import ImageLoadError

    rows: list[torch.Tensor] = []
    for s in range(0, len(records), batch_size):
        chunk = list(records[s:s + batch_size])
        if cache is not None:
            feats, _ = cache.features(model, chunk, on_error=lambda r, e: None)
            if len(feats):
                rows.append(feats.float())
            continue
        pixels = []
        for r in chunk:
            try:
                pixels.append(model.processor.transform(model.processor.load_record_image(r)))
            except ImageLoadError:
                continue
        if pixels:
            rows.append(encode_batch(model, torch.stack(pixels)).cpu())
    return torch.cat(rows) if rows else torch.empty(0)


def encode_batch(model: "MedVQAAdapter", pixel_values: torch.Tensor) -> torch.Tensor:
    """Encoder features of pixel values, the tower in eval mode (as inference and the feature cache compute them);
    its caller's mode is given back."""
    was = model.encoder.training
    model.encoder.eval()
    try:
        with torch.no_grad():
            return model.encode_pixels(pixel_values)
    finally:
        model.encoder.train(was)


def summarize_training_images(model: "MedVQAAdapter", train_records: Sequence["VQARecord"],
                              eval_records: Sequence["VQARecord"] = (), cache: "FeatureCache | None" = None, *,
                              statistic: StatisticName = "mahalanobis", quantile: float = DEFAULT_QUANTILE
                              ) -> ImageSummary | None:
    """The summary of the distinct training images (at most MAX_IMAGES) as the model's encoder sees them now, its
    threshold set on held-out images: the evaluation images that are not training images when there are at least
    MIN_HELD_OUT of them, else a fixed fifth of the training images, left out of the fit. None with fewer than two
    readable images."""
    from .data.cache import encoder_key

    train = _distinct(train_records)
    keys = sorted(train)
    if len(keys) > MAX_IMAGES:  # a deterministic sample: the smallest hashes
        keys = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:MAX_IMAGES]
    evals = [r for k, r in _distinct(eval_records).items() if k not in train]
    if len(evals) >= MIN_HELD_OUT:
        fit_keys, held, where = keys, evals[:MAX_IMAGES], "evaluation images"
    else:
        fit_keys = [k for k in keys if not _held_out(k)]
        held, where = [train[k] for k in keys if _held_out(k)], "a fixed fifth of the training images"
        if len(held) < MIN_HELD_OUT or len(fit_keys) < 2:
            fit_keys, held, where = keys, [], "none (too few images for a threshold)"
    features = image_features(model, [train[k] for k in fit_keys], cache)
    if len(features) < 2:
        return None
    held_features = image_features(model, held, cache) if held else None
    return fit_summary(features, held_features, statistic=statistic, quantile=quantile,
                       encoder_key=encoder_key(model), provenance={"held_out_from": where})


@dataclass
class _Source:
    """The training images a model's summary is (re)computed from when an adapter folder is written."""

    train: list["VQARecord"]
    evals: list["VQARecord"]
    cache: "FeatureCache | None"


def attach_training_images(model: "MedVQAAdapter", train_records: Sequence["VQARecord"],
                           eval_records: Sequence["VQARecord"] = (), cache: "FeatureCache | None" = None) -> None:
    """Remember the run's images on the model: every adapter folder written from now on (`best/`, `last/`,
    `save_pretrained`) carries the summary of these images under the encoder it saves (`summary_for_save`). The
    trainer's one hook, called on every rank where the whole model can run (inside `full_params`, as the feature
    cache fills): a tower that does not train is summarised here, once, so no save has to run it."""
    model._ood_source = _Source(list(train_records), list(eval_records or []), cache)  # type: ignore[attr-defined]
    if not any(p.requires_grad for p in model.encoder.parameters()):
        model.image_summary = summarize_training_images(model, train_records, eval_records or [], cache)


def summary_for_save(model: "MedVQAAdapter") -> ImageSummary | None:
    """The summary an adapter folder written now carries: the model's, recomputed from its attached training images
    (`attach_training_images`) when it was computed under another encoder (a tower that trained since) or never.
    A trained tower sharded across ranks (FSDP, ZeRO-3) cannot run on the writing rank alone: its folder gets no
    summary (a summary of other features would mislead), and a log line says so."""
    from .data.cache import encoder_key

    summary, source = getattr(model, "image_summary", None), getattr(model, "_ood_source", None)
    if source is None:
        return summary
    if _sharded(model.encoder):
        if any(p.requires_grad for p in model.encoder.parameters()):
            log.warning("image summary left out: the trained image tower is sharded across ranks")
            return None
        return summary
    try:
        key = encoder_key(model)
        if summary is None or summary.encoder_key != key:
            summary = summarize_training_images(model, source.train, source.evals, source.cache)
            model.image_summary = summary
    except (RuntimeError, OODError) as exc:  # e.g. a tower sharded across ranks
        log.warning("image summary not updated: %s", exc)
    return summary


def _sharded(module: torch.nn.Module) -> bool:
    """Whether a module's parameters are shards (FSDP's DTensors, DeepSpeed ZeRO-3's partitioned parameters)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in module.parameters())


# --- scoring during inference ------------------------------------------------------------------------------------
def row_scores(model: "MedVQAAdapter", tensors: dict[str, Any], features: torch.Tensor | None = None
               ) -> tuple[dict[str, Any], torch.Tensor | None, list[float | None] | None]:
    """For a processor batch about to be answered: (tensors without pixel values, the features to answer from, one
    score per batch row: the row's last image slot, its query image). Without a summary nothing changes and the
    scores are None; with one, pixels are encoded here once and the model answers from those features."""
    summary: ImageSummary | None = getattr(model, "image_summary", None)
    if summary is None:
        return tensors, features, None
    if features is None:
        features = tensors.get("features")
        if features is None and tensors.get("pixel_values") is not None:
            features = encode_batch(model, tensors["pixel_values"])
    if features is None:
        return tensors, None, None
    tensors = {k: v for k, v in tensors.items() if k not in ("pixel_values", "features")}
    per_image = summary.score(features)
    index = tensors.get("image_index")
    slot_image = [int(i) for i in index] if index is not None else list(range(len(per_image)))
    length = model.processor.image_seq_length
    counts = [int(c) // max(length, 1) for c in tensors["image_mask"].sum(1)]
    out: list[float | None] = []
    start = 0
    for c in counts:
        out.append(per_image[slot_image[start + c - 1]] if c else None)
        start += c
    return tensors, features, out


def report(summary: "ImageSummary | None", score: float | None) -> dict[str, Any]:
    """The per-answer fields: ``ood_score``, ``ood`` (above the threshold) and ``warning`` (`OOD_WARNING` or None)."""
    flagged = summary is not None and summary.flagged(score)
    return {"ood_score": score, "ood": flagged, "warning": OOD_WARNING if flagged else None}


def reported(summary: "ImageSummary | None", scores: Sequence[float | None] | None, n: int
             ) -> list[dict[str, Any]]:
    """`report` for each of ``n`` rows (all empty without scores)."""
    return [report(summary, None if scores is None else scores[i]) for i in range(n)]



def warning_line(summary: "ImageSummary | None", item: Any) -> str | None:
    """The line the CLI prints under a flagged answer (an `Answer` or `ChoiceScores`), None when it is not flagged."""
    if summary is None or not getattr(item, "ood", False):
        return None
    return (f"warning: this image is {OOD_WARNING} (out-of-distribution score {item.ood_score:.3g} above the "
            f"threshold {summary.threshold:.3g}); treat the answer with caution")


# --- evaluation ----------------------------------------------------------------------------------------------------
def refit_threshold(model: "MedVQAAdapter", records: Sequence["VQARecord"], rows: Sequence[dict[str, Any]]
                    ) -> ImageSummary | None:
    """The model's summary with its threshold refitted on held-out in-distribution ``records`` (a validation set,
    answered as ``rows`` that carry ``ood_score``): one score per distinct image. Set on the model and returned;
    unchanged (returned as is) without a summary or with fewer than MIN_HELD_OUT distinct images."""
    summary: ImageSummary | None = getattr(model, "image_summary", None)
    scores: dict[str, float] = {}
    for record, row in zip(records, rows):
        if row and row.get("ood_score") is not None and record.image is not None:
            scores.setdefault(_image_id(record), float(row["ood_score"]))
    if summary is None or len(scores) < MIN_HELD_OUT:
        return summary
    model.image_summary = summary.with_threshold(list(scores.values()), "validation images (calibration set)")
    return model.image_summary


def flagged_summary(predictions: Sequence[dict[str, Any]], correct: Sequence[bool]) -> dict[str, Any]:
    """What metrics.json and report.md say about out-of-distribution images: for flagged and unflagged items, their
    number, accuracy, mean confidence and mean score. Empty when no row carries a score (adapter without summary)."""
    groups: dict[str, list[tuple[dict[str, Any], bool]]] = {"flagged": [], "not flagged": []}
    for p, ok in zip(predictions, correct):
        if p.get("ood_score") is not None:
            groups["flagged" if p.get("ood") else "not flagged"].append((p, bool(ok)))
    if not any(groups.values()):
        return {}

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {name: {"n": len(items), "accuracy": mean([float(ok) for _, ok in items]),
                   "confidence": mean([float(p["confidence"]) for p, _ in items if p.get("confidence") is not None]),
                   "ood_score": mean([float(p["ood_score"]) for p, _ in items])} for name, items in groups.items()}


def report_section(table: dict[str, Any], md_table: Any) -> list[str]:
    """report.md's section on out-of-distribution images (``md_table`` formats the table)."""
    if not table:
        return []
    rows = [[name, cell["n"], cell["accuracy"], cell["confidence"], cell["ood_score"]] for name, cell in table.items()]
    return ["", "## Images unlike the training images", "",
            f"An item is flagged when its image is {OOD_WARNING}: its out-of-distribution score (distance of its "
            "encoder features from the training images', see prefixvqa/ood.py) lies above the adapter's threshold "
            "(95 % of held-out in-distribution images pass). Flagged answers deserve less trust whatever their "
            "confidence.", "",
            md_table(["items", "n", "accuracy", "mean confidence", "mean score"], rows)]


def features_report(model: "MedVQAAdapter", features: torch.Tensor) -> dict[str, Any]:
    """`report` for one image given its (1, N, D) encoder features: what the app's answer carries."""
    summary: ImageSummary | None = getattr(model, "image_summary", None)
    return report(summary, summary.score(features)[0] if summary is not None else None)
