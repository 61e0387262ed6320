"""Evaluation on held-out data: accuracy and macro-F1, overall and per subset of present modalities.

Besides each dataset's own scores, :func:`evaluate` returns per-class counts (a confusion matrix overall,
and per class: true examples, predictions, correct predictions for each subset). Counts add up across
datasets, so the scores of all held-out data together ("pooled") follow from their sums
(:func:`scores_from_counts`), exactly as if every prediction had been made in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional  # noqa: F401  (cross_entropy)

from common.data.samples import MultimodalData, modality_subsets, subset_key
from common.model.multimodal import MultimodalModel


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


def class_counts(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> dict[str, list[int]]:
    """Per class: ``support`` (true examples), ``predicted`` (predictions of it) and ``correct`` (both)."""
    return {
        "support": torch.bincount(y_true, minlength=num_classes).tolist(),
        "predicted": torch.bincount(y_pred, minlength=num_classes).tolist(),
        "correct": torch.bincount(y_true[y_true == y_pred], minlength=num_classes).tolist(),
    }


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    flat = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).tolist()


def counts_from_confusion(matrix: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """(support, predicted, correct) per class of a confusion matrix (rows: true class, columns: predicted)."""
    k = len(matrix)
    return [sum(row) for row in matrix], [sum(row[c] for row in matrix) for c in range(k)], [matrix[c][c] for c in range(k)]


def class_f1(support: list[int], predicted: list[int], correct: list[int]) -> list[float | None]:
    """Each class's F1 from its counts, 2tp / (2tp + fp + fn) = 2·correct / (support + predicted); None where
    the class is neither true nor predicted anywhere (undefined)."""
    return [2 * c / (s + p) if s + p > 0 else None for s, p, c in zip(support, predicted, correct)]


def scores_from_counts(support: list[int], predicted: list[int], correct: list[int]) -> dict[str, float | int]:
    """Accuracy and macro-F1 from per-class counts (the same values :func:`macro_f1` gives on the predictions)."""
    n = sum(support)
    f1s = [f for f in class_f1(support, predicted, correct) if f is not None]
    return {"accuracy": sum(correct) / n if n else 0.0, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "num_examples": n}


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
    holds the predicted class of every sample (all its modalities present), for pooling across datasets;
    ``confusion`` (overall) and ``class_counts`` (per subset) pool the same way without the predictions.
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
        "confusion": confusion_matrix(data.labels, pred, k),
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
            "class_counts": class_counts(part.labels, p, k),
        }
    return out


OWN_MODALITIES = "each sample's own modalities"  # the overall figure: every sample with whatever modalities it has


def shown_subsets(by_modalities: dict[str, dict], *, limit: int = 12) -> list[str]:
    """The modality subsets worth showing in a table or plot, at most ``limit`` (everything stays in results.json).

    Every single modality, the largest subset (all modalities together) when scored, then the other
    subsets with the highest macro-F1 until ``limit`` rows.
    """
    singles = [s for s in by_modalities if "+" not in s]
    full = max(by_modalities, key=lambda s: s.count("+"), default=None)
    chosen = singles + ([full] if full is not None and "+" in full else [])
    rest = sorted((s for s in by_modalities if s not in chosen), key=lambda s: -by_modalities[s].get("macro_f1", 0.0))
    chosen += rest[: max(0, limit - len(chosen))]
    return sorted(chosen, key=lambda s: (s.count("+"), s))


def headline(evaluation: dict | None) -> dict | None:
    """A round's headline figures in results.json: ``pooled`` when the clients sent per-class counts, else ``client_mean``."""
    if not evaluation:
        return None
    return evaluation.get("pooled") or evaluation.get("client_mean")
