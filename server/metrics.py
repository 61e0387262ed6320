"""A round's evaluation figures from the clients' evaluate replies: pooled, and the mean of the clients' own.

- ``pooled``: every held-out example of every client together, as if scored in one place. Accuracy and
  macro-F1 follow from the summed per-class counts (the sites release confusion matrices and per-class
  counts as evaluation metrics, ``release.eval-metrics``); the loss is the example-weighted mean of the
  clients' mean losses, which is the mean over all examples.
- ``client_mean``: each client's own accuracy and macro-F1, averaged with weights = its test examples.
  It equals the pooled accuracy, but not the pooled macro-F1 (a mean of F1s is not the F1 of the sums).
"""

from __future__ import annotations

from typing import Any

from common import messages as M
from common.model.evaluation import class_f1, counts_from_confusion, scores_from_counts
from server.replies import EvaluateReply, mean_metrics


def summarize_evaluation(replies: list[EvaluateReply], labels: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
    """``{"num_examples", "pooled", "client_mean", "clients"}`` for a round's evaluate replies (None: no scores)."""
    mean = mean_metrics(replies)
    if mean is None:
        return None
    client_mean = {k: mean[k] for k in ("accuracy", "macro_f1", "loss", "num_examples", "by_modalities")}
    return {
        "num_examples": mean["num_examples"],
        "pooled": pooled_metrics(replies, labels),
        "client_mean": client_mean,
        "clients": mean["clients"],
    }


def pooled_metrics(replies: list[EvaluateReply], labels: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
    """Scores of all the replies' held-out examples together, from their per-class counts (None: no counts)."""
    k = len(labels)
    counted = [r for r in replies if r.num_examples > 0 and r.confusion is not None]
    if not counted:
        return None
    confusion = [[sum(r.confusion[i][j] for r in counted) for j in range(k)] for i in range(k)]  # type: ignore[index]
    support, predicted, correct = counts_from_confusion(confusion)
    n = sum(support)
    losses = [(r.overall[M.LOSS], r.num_examples) for r in counted if M.LOSS in r.overall]
    out: dict[str, Any] = scores_from_counts(support, predicted, correct)
    out["loss"] = sum(v * w for v, w in losses) / sum(w for _, w in losses) if losses else None
    out["clients"] = len(counted)
    out["labels"] = list(labels)
    out["per_class"] = _per_class(support, predicted, correct)
    out["confusion"] = confusion  # rows: true class, columns: predicted class, in the order of "labels"
    by: dict[str, Any] = {}
    subsets = sorted({s for r in counted for s in r.class_counts}, key=lambda s: (s.count("+"), s))
    for subset in subsets:
        parts = [r.class_counts[subset] for r in counted if subset in r.class_counts]
        sums = {name: [sum(p[name][c] for p in parts) for c in range(k)] for name in M.CLASS_COUNTS}
        by[subset] = scores_from_counts(sums[M.SUPPORT], sums[M.PREDICTED], sums[M.CORRECT]) | {"per_class": sums}
    out["by_modalities"] = by
    assert out["num_examples"] == n
    return out


def _per_class(support: list[int], predicted: list[int], correct: list[int]) -> dict[str, list]:
    """Per class (in label order): the counts, precision, recall and F1 (None where undefined)."""

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "support": support,
        "predicted": predicted,
        "correct": correct,
        "precision": [ratio(c, p) for c, p in zip(correct, predicted)],
        "recall": [ratio(c, s) for c, s in zip(correct, support)],
        "f1": class_f1(support, predicted, correct),
    }
