"""Evaluation on held-out data: accuracy and macro-F1, overall and per subset of present modalities."""

from __future__ import annotations

import torch
import torch.nn.functional  # noqa: F401  (cross_entropy)

from common.data import MultimodalData, modality_subsets, subset_key
from common.model import MultimodalModel


def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``y_true`` or ``y_pred``."""
    if len(y_true) == 0:
        return 0.0
    f1s = []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: not counted (as scikit-learn does)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


@torch.no_grad()
def logits(model: MultimodalModel, data: MultimodalData, mask: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """Model outputs (N, K), with ``mask`` (default: the data's own) deciding what is present."""
    model.eval()
    mask = data.mask if mask is None else mask
    out = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        out.append(model({n: x[sl] for n, x in data.inputs.items()}, mask[sl]))
    return torch.cat(out)


def predict(model: MultimodalModel, data: MultimodalData, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted class per sample."""
    return logits(model, data, mask).argmax(dim=1)


def evaluate(model: MultimodalModel, data: MultimodalData) -> dict:
    """Accuracy and macro-F1 on ``data``, overall and for each subset of its modalities.

    For a subset S the model sees only S, on the samples that have every modality of S. ``predictions``
    holds the predicted class of every sample (all its modalities present), for pooling across datasets.
    """
    k = data.schema.num_classes
    out_logits = logits(model, data)
    pred = out_logits.argmax(dim=1)
    out: dict = {
        "accuracy": float((pred == data.labels).float().mean()),
        "macro_f1": macro_f1(data.labels, pred, k),
        "loss": float(torch.nn.functional.cross_entropy(out_logits, data.labels)),
        "num_examples": len(data),
        "predictions": pred,
        "by_modalities": {},
    }
    names = data.schema.names
    for subset in modality_subsets(names):
        cols = torch.tensor([names.index(n) for n in subset])
        rows = data.mask[:, cols].all(dim=1).nonzero().flatten()
        if len(rows) == 0:
            continue
        part = data.subset(rows)
        only = torch.zeros_like(part.mask)
        only[:, cols] = True
        p = predict(model, part, only)
        out["by_modalities"][subset_key(subset)] = {
            "accuracy": float((p == part.labels).float().mean()),
            "macro_f1": macro_f1(part.labels, p, k),
            "num_examples": len(part),
        }
    return out
