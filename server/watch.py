"""Warnings about a run's learning, from its held-out figures: stuck at chance, or collapsed.

Both read only what results.json holds (each evaluated round's headline figures, pooled when the
clients sent per-class counts), so they are recomputed from the rounds after every round and on
resume, and they cost the sites nothing beyond the evaluation metrics they already release.

- **chance**: after ``CHANCE_AFTER`` rounds (or in the last round), held-out accuracy is no better
  than always predicting the most frequent test class (or 1/K), within ``CHANCE_MARGIN``.
- **collapse**: accuracy falls at least ``COLLAPSE_DROP`` below the best earlier round, and by
  more than sampling noise on that many test examples (three standard errors).
- **final-below-best**: the last evaluated round is such a drop below the best one. Its figures are
  still the ones reported: picking the best round by its test score would overstate it.
"""

from __future__ import annotations

import math
from typing import Any

from common.model.evaluation import headline

CHANCE_AFTER = 3  # rounds before "not learning" is worth a warning
CHANCE_MARGIN = 0.02  # accuracy within this of the majority-class share counts as chance
COLLAPSE_DROP = 0.10  # absolute drop in accuracy below the best earlier round


def learning_warnings(rounds: list[dict[str, Any]], total_rounds: int) -> list[dict[str, Any]]:
    """Every warning the rounds so far call for, in round order: ``{"round", "kind", "message"}``."""
    out: list[dict[str, Any]] = []
    best: tuple[int, float] | None = None  # (round, accuracy)
    collapsed = chance_warned = False
    scored = [(r["round"], headline(r.get("evaluate"))) for r in rounds if headline(r.get("evaluate"))]
    for i, (rnd, ev) in enumerate(scored):
        acc, n = float(ev["accuracy"]), int(ev["num_examples"])
        chance = _chance(ev)
        if (
            not chance_warned
            and chance is not None
            and (rnd >= CHANCE_AFTER or rnd >= total_rounds)
            and acc <= chance + CHANCE_MARGIN
        ):
            chance_warned = True
            out.append(
                {
                    "round": rnd,
                    "kind": "chance",
                    "message": (
                        f"held-out accuracy {acc:.3f} after {rnd} round(s) is at chance level ({chance:.3f}: always "
                        "predicting the most frequent class): the model is not learning. Check each modality's value range "
                        "(`fedfuse data inspect DIR`; declare a fixed scaling in schema.json), the learning rate, and how much "
                        "noise the privacy budget forces (`fedfuse plan --data DIR`)"
                    ),
                }
            )
        if best is not None and _dropped(best[1], acc, n):
            if not collapsed:
                out.append(
                    {
                        "round": rnd,
                        "kind": "collapse",
                        "message": (
                            f"held-out accuracy fell to {acc:.3f} from {best[1]:.3f} at round {best[0]}: training collapsed "
                            "(a learning rate too high for the noise, or a diverging site); later figures may stay low"
                        ),
                    }
                )
            collapsed = True
        elif best is not None and acc >= best[1] - COLLAPSE_DROP / 2:
            collapsed = False  # recovered: a later collapse is worth a new warning
        if best is None or acc > best[1]:
            best = (rnd, acc)
        if i == len(scored) - 1 and rnd >= total_rounds and best[0] != rnd and _dropped(best[1], acc, n):
            out.append(
                {
                    "round": rnd,
                    "kind": "final-below-best",
                    "message": (
                        f"the final held-out accuracy {acc:.3f} is below the {best[1]:.3f} of round {best[0]}; the final "
                        "figures are the ones reported (choosing a round by its test score would overstate it)"
                    ),
                }
            )
    return out


def _chance(ev: dict[str, Any]) -> float | None:
    """Accuracy of always predicting the most frequent test class (1/K without per-class counts)."""
    per_class = ev.get("per_class")
    if per_class and sum(per_class["support"]):
        return max(per_class["support"]) / sum(per_class["support"])
    labels = ev.get("labels")
    return 1 / len(labels) if labels else None


def _dropped(best: float, acc: float, n: int) -> bool:
    """A drop of at least COLLAPSE_DROP that is also beyond three standard errors of an accuracy on n examples."""
    noise = 3 * math.sqrt(max(best * (1 - best), 1e-12) / max(n, 1))
    return best - acc >= max(COLLAPSE_DROP, noise)
