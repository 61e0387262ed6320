"""What each modality contributes: Shapley values and pairwise interaction indices of a game over modalities.

The game: a coalition S of modalities is worth v(S), the held-out score (accuracy, macro-F1, or one
class's recall / F1) of the global model when only the modalities in S are visible. fedfuse already
scores every subset on held-out data (``common/model/evaluation.py``), so nothing new leaves a site.

- **The empty coalition.** v(∅) is chance level, 1/K for K classes: the expected score of guessing a
  class uniformly at random without looking at any input. It is exact for accuracy and for a class's
  recall whatever the class balance, and for (macro-)F1 when the classes are balanced. (The model
  itself cannot score "no modality": its fusion head needs at least one present input.)
- **Shapley value** of modality i (Shapley 1953): its marginal gain v(S ∪ {i}) − v(S) averaged over
  every order in which the modalities could join. The values sum to v(all) − v(∅) (efficiency).
- **Interaction index** of a pair {i, j} (Grabisch and Roubens 1999, the Shapley interaction index):
  the average of v(S ∪ {i, j}) − v(S ∪ {i}) − v(S ∪ {j}) + v(S) over coalitions S without i and j,
  weighted as if i and j joined as one player. Positive: the pair is worth more together than its
  parts (they cooperate, each telling apart what the other cannot); negative: they are redundant.
- **Exact up to** :data:`EXACT_MAX` modalities (2^M coalitions). Beyond, both are estimated by
  sampling random orders (Castro, Gómez and Tejada 2009) with a fixed seed, and each estimate comes
  with its standard error (``stderr``); the true value lies within ±1.96 · stderr of the estimate
  with about 95 % confidence.

:func:`subset_figures` is the one place that reads per-subset figures out of results.json.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

EXACT_MAX = 8  # exact over 2^M coalitions up to this many modalities, sampled beyond
SAMPLES = 4000  # random orders (per pair, for interactions) when sampling
SEED = 0  # the sampled estimate is reproducible: it draws on public evaluation scores only

# Unimodal collapse: one modality takes more than COLLAPSE_SHARE (of attention fusion's attention weight, or
# else of the Shapley gain in accuracy) while another modality alone scores at least WELL_ABOVE_CHANCE
# (absolute accuracy) above chance: the model ignores evidence it could use.
COLLAPSE_SHARE = 0.75
WELL_ABOVE_CHANCE = 0.2
METRICS = ("accuracy", "macro_f1")

Coalition = frozenset
Game = Callable[[frozenset], float]


@dataclass(frozen=True)
class Attribution:
    """Shapley values and interaction indices of one game."""

    players: tuple[str, ...]
    full: float  # v(all players)
    empty: float  # v(∅), chance level
    shapley: dict[str, float]
    interactions: dict[tuple[str, str], float]  # (i, j) in players order
    alone: dict[str, float] = field(default_factory=dict)  # v({i}): each modality on its own
    exact: bool = True
    stderr: dict[str, float] = field(default_factory=dict)  # sampled estimates only: Shapley values
    interaction_stderr: dict[tuple[str, str], float] = field(default_factory=dict)

    def share(self, player: str) -> float:
        """The player's fraction of the gain over chance (nan when there is no gain)."""
        gain = self.full - self.empty
        return self.shapley[player] / gain if gain > 1e-12 else math.nan

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "modalities": list(self.players),
            "full": self.full,
            "empty": self.empty,
            "exact": self.exact,
            "alone": dict(self.alone),
            "shapley": dict(self.shapley),
            "interactions": {f"{i}+{j}": v for (i, j), v in self.interactions.items()},
        }
        if not self.exact:
            out["stderr"] = dict(self.stderr)
            out["interaction_stderr"] = {f"{i}+{j}": v for (i, j), v in self.interaction_stderr.items()}
        return out


class IncompleteGame(ValueError):
    """A coalition the attribution needs has no score."""


def _game(players: Sequence[str], values: Mapping[frozenset, float] | Game, empty: float) -> Game:
    """v as a function: the mapping's score of S, ``empty`` for ∅; IncompleteGame for a missing S."""
    if callable(values):
        return lambda s: empty if not s else float(values(s))

    def v(s: frozenset) -> float:
        if not s:
            return empty
        try:
            return float(values[s])
        except KeyError:
            raise IncompleteGame(f"no score for the coalition {'+'.join(p for p in players if p in s)}") from None

    return v


def missing_coalitions(players: Sequence[str], values: Mapping[frozenset, float]) -> list[str]:
    """The non-empty coalitions of ``players`` that ``values`` lacks, as ``a+b`` names."""
    return ["+".join(c) for k in range(1, len(players) + 1) for c in combinations(players, k) if frozenset(c) not in values]


def _exact(players: tuple[str, ...], v: Game) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    n = len(players)
    shapley = {}
    for i in players:
        others = [p for p in players if p != i]
        total = 0.0
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            total += weight * sum(v(frozenset(s) | {i}) - v(frozenset(s)) for s in combinations(others, k))
        shapley[i] = total
    interactions = {}
    for i, j in combinations(players, 2):
        others = [p for p in players if p not in (i, j)]
        total = 0.0
        for k in range(n - 1):
            weight = math.factorial(k) * math.factorial(n - k - 2) / math.factorial(n - 1)
            for s in map(frozenset, combinations(others, k)):
                total += weight * (v(s | {i, j}) - v(s | {i}) - v(s | {j}) + v(s))
        interactions[(i, j)] = total
    return shapley, interactions


def _mean_and_stderr(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var / len(xs))


def _sampled(players: tuple[str, ...], v: Game, samples: int, rng: random.Random):
    # Shapley: marginal gains along random orders (every player's gain from each order).
    gains: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(samples):
        order = list(players)
        rng.shuffle(order)
        s: frozenset = frozenset()
        before = v(s)
        for p in order:
            s = s | {p}
            after = v(s)
            gains[p].append(after - before)
            before = after
    shapley, stderr = {}, {}
    for p in players:
        shapley[p], stderr[p] = _mean_and_stderr(gains[p])
    # Interactions: {i, j} joins as one player of an (M-1)-player game; S = who came before it.
    interactions, istderr = {}, {}
    for i, j in combinations(players, 2):
        merged = [p for p in players if p not in (i, j)] + [None]
        deltas = []
        for _ in range(samples):
            rng.shuffle(merged)
            s = frozenset(merged[: merged.index(None)])
            deltas.append(v(s | {i, j}) - v(s | {i}) - v(s | {j}) + v(s))
        interactions[(i, j)], istderr[(i, j)] = _mean_and_stderr(deltas)
    return shapley, interactions, stderr, istderr


def attribute(
    players: Iterable[str],
    values: Mapping[frozenset, float] | Game,
    *,
    empty: float,
    exact_max: int = EXACT_MAX,
    samples: int = SAMPLES,
    seed: int = SEED,
) -> Attribution:
    """Shapley values and interaction indices of the game ``values`` (coalition -> score; v(∅) = ``empty``).

    Exact for up to ``exact_max`` players; beyond, estimated from ``samples`` random orders, with
    standard errors. IncompleteGame when a coalition the computation needs has no score.
    """
    players = tuple(players)
    if not players:
        raise ValueError("a game needs at least one modality")
    if len(set(players)) != len(players):
        raise ValueError(f"repeated modality in {list(players)}")
    v = _game(players, values, empty)
    full = v(frozenset(players))
    alone = {p: v(frozenset({p})) for p in players}
    if len(players) <= exact_max:
        shapley, interactions = _exact(players, v)
        return Attribution(players, full, empty, shapley, interactions, alone)
    if samples < 2:
        raise ValueError("the sampled estimate needs at least 2 samples")
    shapley, interactions, stderr, istderr = _sampled(players, v, samples, random.Random(seed))
    return Attribution(players, full, empty, shapley, interactions, alone, exact=False, stderr=stderr, interaction_stderr=istderr)


# --- from results.json --------------------------------------------------------------------------


def subset_figures(evaluation: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any], str]:
    """``(figures per subset, overall figures, source)`` of one round's ``evaluate`` entry of results.json.

    The one place that knows where results.json keeps them: ``pooled`` (every held-out prediction
    together, from the clients' per-class counts) when the entry has it, otherwise the example-weighted
    mean of the clients' own scores (``client_mean``, or the entry itself in results written before).
    """
    pooled = evaluation.get("pooled")
    if isinstance(pooled, Mapping) and isinstance(pooled.get("by_modalities"), Mapping) and pooled["by_modalities"]:
        return pooled["by_modalities"], pooled, "pooled"
    mean = evaluation.get("client_mean")
    mean = mean if isinstance(mean, Mapping) else evaluation
    return mean.get("by_modalities") or {}, mean, "client-weighted mean"


def coalition_scores(evaluation: Mapping[str, Any], metric: str) -> tuple[dict[frozenset, float], str]:
    """``({coalition: score}, source)`` for ``metric`` from one round's ``evaluate`` entry (see :func:`subset_figures`)."""
    by, _, source = subset_figures(evaluation)
    scores = {
        frozenset(s.split("+")): float(m[metric])
        for s, m in by.items()
        if isinstance(m, Mapping) and isinstance(m.get(metric), (int, float))
    }
    return scores, source


def class_scores(by_modalities: Mapping[str, Any], num_classes: int) -> dict[str, list[dict[frozenset, float]]]:
    """Per class, ``{coalition: score}`` for recall (``accuracy``) and F1 (``macro_f1``).

    From each subset's per-class counts: ``per_class`` (``support``, ``predicted``, ``correct`` per class)
    or a ``confusion`` matrix (rows true class, columns predicted). Empty lists when results.json has
    neither. A class with no held-out example in a subset has no score there.
    """
    from common.model.evaluation import class_f1  # torch: imported only when class scores are asked for

    out: dict[str, list[dict[frozenset, float]]] = {m: [{} for _ in range(num_classes)] for m in METRICS}
    found = False
    for subset, figures in by_modalities.items():
        counts = _class_counts(figures, num_classes) if isinstance(figures, Mapping) else None
        if counts is None:
            continue
        found = True
        coalition = frozenset(subset.split("+"))
        for c, (support, correct, f1) in enumerate(zip(counts[0], counts[2], class_f1(*counts))):
            if support:
                out["accuracy"][c][coalition] = correct / support
                out["macro_f1"][c][coalition] = f1
    return out if found else {m: [] for m in METRICS}


def _class_counts(figures: Mapping[str, Any], k: int) -> tuple[list[int], list[int], list[int]] | None:
    """(support, predicted, correct) per class of one subset's figures, or None."""
    per_class = figures.get("per_class")
    if isinstance(per_class, Mapping) and all(len(per_class.get(n) or []) == k for n in ("support", "predicted", "correct")):
        return list(per_class["support"]), list(per_class["predicted"]), list(per_class["correct"])
    matrix = figures.get("confusion")
    if isinstance(matrix, list) and len(matrix) == k and all(isinstance(row, list) and len(row) == k for row in matrix):
        from common.model.evaluation import counts_from_confusion

        return counts_from_confusion(matrix)
    return None


def _players(scores: Mapping[frozenset, float], order: Sequence[str]) -> tuple[str, ...]:
    seen = set().union(*scores) if scores else set()
    return tuple([m for m in order if m in seen] + sorted(seen - set(order)))


def _attribute_or_reason(scores: Mapping[frozenset, float], players: tuple[str, ...], chance: float) -> dict[str, Any]:
    if not players:
        return {"error": "no per-subset scores"}
    if len(players) <= EXACT_MAX:
        missing = missing_coalitions(players, scores)
        if missing:
            return {
                "modalities": list(players),
                "error": f"no held-out score for {', '.join(missing)}: no evaluated sample has those modalities together",
            }
    try:
        return attribute(players, scores, empty=chance).to_json()
    except IncompleteGame as exc:
        return {"modalities": list(players), "error": str(exc)}


def modality_contributions(evaluation: Mapping[str, Any], *, modalities: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """The ``modality_contributions`` entry of one round's evaluation (see the module docstring).

    Overall and per class for the federation; per client over the modalities that client holds;
    with any unimodal-collapse warnings.
    """
    chance = 1.0 / len(labels)
    out: dict[str, Any] = {
        "empty_value": chance,
        "empty_value_means": f"chance level 1/K = 1/{len(labels)}: guessing without any modality",
    }
    overall: dict[str, Any] = {}
    for metric in METRICS:
        scores, source = coalition_scores(evaluation, metric)
        out["source"] = source
        overall[metric] = _attribute_or_reason(scores, _players(scores, modalities), chance)
    out["overall"] = overall
    per_class = class_scores(subset_figures(evaluation)[0], len(labels))
    if per_class["accuracy"]:
        out["per_class"] = {
            metric: {
                labels[c]: _attribute_or_reason(s, _players(s, modalities), chance) for c, s in enumerate(per_class[metric]) if s
            }
            for metric in METRICS
        }
    clients = {}
    for cid, figures in sorted((evaluation.get("clients") or {}).items()):
        entry = {}
        for metric in METRICS:
            scores = {
                frozenset(s.split("+")): float(m[metric])
                for s, m in (figures.get("by_modalities") or {}).items()
                if isinstance(m.get(metric), (int, float))
            }
            entry[metric] = _attribute_or_reason(scores, _players(scores, modalities), chance)
        clients[cid] = entry
    if clients:
        out["clients"] = clients
    if evaluation.get("attention"):
        # {modality: {class index: {"mean", "samples"}}} (common/insight/attention.py) -> {modality: {label: mean weight}}
        out["attention"] = {
            m: {labels[int(c)]: v["mean"] for c, v in per.items() if int(c) < len(labels)}
            for m, per in evaluation["attention"].items()
        }
    out["warnings"] = _collapse(overall, evaluation.get("attention"), chance)
    return out


def collapse_warnings(alone: Mapping[str, float], shares: Mapping[str, float], chance: float, *, measure: str) -> list[str]:
    """Unimodal collapse: a modality's share (``measure``) is above :data:`COLLAPSE_SHARE` while another
    modality alone scores at least :data:`WELL_ABOVE_CHANCE` above chance in held-out accuracy."""
    warnings = []
    for m, share in shares.items():
        if not share > COLLAPSE_SHARE:
            continue
        strong = [o for o in alone if o != m and alone[o] - chance >= WELL_ABOVE_CHANCE]
        if strong:
            warnings.append(
                f"unimodal collapse: {m} takes {share:.0%} of the {measure}, although "
                + ", ".join(f"{o} alone reaches {alone[o]:.2f}" for o in strong)
                + f" held-out accuracy (chance {chance:.2f}); the model leans on {m} and ignores evidence it could "
                "use (try train.modality-dropout, or check the other modalities' encoders and scaling)"
            )
    return warnings


def _collapse(overall: Mapping[str, Any], attention: Mapping[str, Mapping[str, Any]] | None, chance: float) -> list[str]:
    """Warnings from attention shares (attention fusion) or else Shapley shares of held-out accuracy."""
    acc = overall.get("accuracy") or {}
    alone, shapley = acc.get("alone") or {}, acc.get("shapley") or {}
    if len(alone) < 2:
        return []
    if attention:  # the head's own weights: mean over every sample it weighed
        totals = {
            m: (sum(v["mean"] * v["samples"] for v in per.values()), sum(v["samples"] for v in per.values()))
            for m, per in attention.items()
        }
        shares = {m: s / n for m, (s, n) in totals.items() if n}
        return collapse_warnings(alone, shares, chance, measure="attention fusion's mean attention weight")
    gain = acc["full"] - acc["empty"]
    if gain <= 1e-12:
        return []
    shares = {m: phi / gain for m, phi in shapley.items()}
    return collapse_warnings(alone, shares, chance, measure="gain in held-out accuracy over chance (Shapley share)")
