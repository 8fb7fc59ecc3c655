"""BERTScore as the ``bert_score`` package computes it (what ``evaluate.load("bertscore")`` runs), with the encoder
and the layer as settings.

van Sonsbeek et al. (tjvsonsbeek/open-ended-medical-vqa @ c605aeb, ``predict.py``) scored every answer with
``evaluate``'s bertscore, ``model_type='bert-base-uncased'``: bert_score's defaults, i.e. layer 9 of that model, no
idf weighting, no baseline rescaling. :func:`bertscore` reproduces that rule (Tiiiger/bert_score 0.3.13,
``bert_score/utils.py`` ``greedy_cos_idf``, ``model2layers``) without the package; prefixvqa's own BERTScore-style
F1 (:func:`prefixvqa.eval.metrics.bert_similarity`) keeps special tokens out of the matching, this one does not.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

from .errors import EvaluationError

__all__ = ["BERT_SCORE_LAYERS", "bertscore_layer", "bertscore"]

#: bert_score's default layer per model name (its ``model2layers``, the entries for encoders a medical VQA user
#: may pick); any other model needs an explicit layer
BERT_SCORE_LAYERS: dict[str, int] = {
    "bert-base-uncased": 9, "bert-large-uncased": 18, "bert-base-cased-finetuned-mrpc": 9,
    "bert-base-multilingual-cased": 9, "bert-base-chinese": 8, "roberta-base": 10, "roberta-large": 17,
    "roberta-large-mnli": 19, "distilbert-base-uncased": 5, "allenai/scibert_scivocab_uncased": 8,
}


def bertscore_layer(model: str, layer: int | None = None) -> int:
    """The layer BERTScore reads: ``layer`` if given, else bert_score's default for ``model`` (a hub id, or a local
    folder named like one: ".../bert-base-uncased" -> 9); an unknown model without a layer is an error."""
    if layer is not None:
        if layer < 0:
            raise EvaluationError(f"BERTScore layer must be >= 0, got {layer}")
        return layer
    for key in (str(model), Path(str(model)).name):
        if key in BERT_SCORE_LAYERS:
            return BERT_SCORE_LAYERS[key]
    raise EvaluationError(f"BERTScore: no default layer for {model!r} (bert_score knows {sorted(BERT_SCORE_LAYERS)});"
                          " set the layer (--bert-layer N, or the protocol's bertscore_layer)")


@functools.lru_cache(maxsize=2)
def _load(model: str, device: str) -> tuple[Any, Any]:
    from .metrics import _require

    transformers = _require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    encoder = transformers.AutoModel.from_pretrained(model).to(device).eval()
    return tokenizer, encoder


def bertscore(preds: Sequence[str], refs: Sequence[str], model: str = "bert-base-uncased", layer: int | None = None,
              *, device: str | None = None) -> dict[str, list[float]]:
    """BERTScore precision/recall/F1 per pair, as bert_score 0.3.13 computes it with ``idf=False`` and no rescaling
    (the settings of ``evaluate``'s bertscore that tjvsonsbeek/open-ended-medical-vqa @ c605aeb ``predict.py`` used).

    Each text, stripped, is encoded with the special tokens (``[CLS] ... [SEP]``, truncated to the tokenizer's
    maximum length) and embedded alone; token vectors are ``hidden_states[layer]`` (:func:`bertscore_layer`: 9 for
    bert-base-uncased; bert_score cuts the encoder after that layer, the same vectors), L2-normalised. Every token,
    special ones included, is a match candidate; the averages weight ``[CLS]``/``[SEP]`` ids 0 and every other token
    1: ``P`` = mean over the prediction's other tokens of their best cosine with any reference token, ``R`` the same
    the other way, ``F = 2PR/(P+R)``. A side with no token besides the two specials scores 0, 0, 0. Each pair alone,
    as upstream's one-pair calls: batched calls of bert_score may also match a padding zero when every cosine of a
    token is negative.
    """
    if len(preds) != len(refs):
        raise EvaluationError(f"got {len(preds)} predictions but {len(refs)} references")
    from .metrics import _require

    torch = _require("torch")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, encoder = _load(str(model), device)
    index = bertscore_layer(str(model), layer)
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id} - {None}
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)

    @functools.lru_cache(maxsize=None)
    def embed(text: str) -> tuple[Any, Any]:
        ids = tokenizer.encode(text.strip(), add_special_tokens=True, max_length=limit, truncation=True)
        with torch.no_grad():
            out = encoder(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
        if index >= len(out.hidden_states):
            raise EvaluationError(f"BERTScore layer {index} does not exist: {model!r} has "
                                  f"{len(out.hidden_states) - 1} layers")
        hidden = out.hidden_states[index][0].float()
        weight = torch.tensor([0.0 if i in special else 1.0 for i in ids], device=device)
        return hidden / hidden.norm(dim=-1, keepdim=True), weight

    result: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
    for pred, ref in zip(preds, refs):
        (h, hw), (r, rw) = embed(pred), embed(ref)
        if len(hw) <= 2 or len(rw) <= 2:
            p = rec = f = 0.0
        else:
            sim = h @ r.T  # float32 throughout, in upstream's order of operations
            pt = (sim.max(dim=1).values * (hw / hw.sum())).sum()
            rt = (sim.max(dim=0).values * (rw / rw.sum())).sum()
            ft = 2 * pt * rt / (pt + rt)
            p, rec, f = float(pt), float(rt), (0.0 if bool(torch.isnan(ft)) else float(ft))
        for key, value in zip(("precision", "recall", "f1"), (p, rec, f)):
            result[key].append(value)
    return result
