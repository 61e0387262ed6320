"""Modality contributions: Shapley values and interaction indices on games with known answers, read from
results.json-shaped evaluations, and on a model trained on the synthetic dataset."""

import math

import pytest
import torch

from common.insight.contributions import (
    COLLAPSE_SHARE,
    Attribution,
    IncompleteGame,
    attribute,
    coalition_scores,
    modality_contributions,
)

F = frozenset


def game(**values):
    """``game(a=.5, ab=.9)`` -> {frozenset("a"): .5, frozenset("ab"): .9} (one-letter players)."""
    return {F(k): v for k, v in values.items()}


def test_two_modalities_match_hand_computed_values():
    # v(∅) = 0.1, v(a) = 0.5, v(b) = 0.3, v(ab) = 0.9:
    # φ_a = ((0.5 - 0.1) + (0.9 - 0.3)) / 2 = 0.5, φ_b = ((0.3 - 0.1) + (0.9 - 0.5)) / 2 = 0.3,
    # I_ab = 0.9 - 0.5 - 0.3 + 0.1 = 0.2
    result = attribute("ab", game(a=0.5, b=0.3, ab=0.9), empty=0.1)
    assert result.shapley == pytest.approx({"a": 0.5, "b": 0.3})
    assert result.interactions == pytest.approx({("a", "b"): 0.2})
    assert sum(result.shapley.values()) == pytest.approx(result.full - result.empty)
    assert result.exact and result.alone == pytest.approx({"a": 0.5, "b": 0.3})


def test_three_modalities_match_hand_computed_values():
    # a adds 0.6 to every coalition; b and c are worth more together (0.4) than apart (0.2 + 0).
    values = game(a=0.6, b=0.2, c=0.0, ab=0.8, ac=0.6, bc=0.4, abc=1.0)
    result = attribute("abc", values, empty=0.0)
    # φ_b: weights 1/3, 1/6, 1/6, 1/3 on S = ∅, {a}, {c}, {a,c}: 0.2/3 + 0.2/6 + 0.4/6 + 0.4/3 = 0.3
    assert result.shapley == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert result.interactions == pytest.approx({("a", "b"): 0.0, ("a", "c"): 0.0, ("b", "c"): 0.2})
    assert sum(result.shapley.values()) == pytest.approx(1.0)
    assert result.share("a") == pytest.approx(0.6)


def test_the_synthetic_datasets_ideal_game_splits_the_gain_equally_with_redundant_pairs():
    # Each modality tells 2 of 6 classes apart: 1/2 alone, 5/6 in pairs, 1 together, chance 1/6.
    values = {F(s): v for s, v in [("i", 0.5), ("s", 0.5), ("t", 0.5), ("is", 5 / 6), ("it", 5 / 6), ("st", 5 / 6), ("ist", 1.0)]}
    result = attribute(["i", "s", "t"], values, empty=1 / 6)
    assert result.shapley == pytest.approx({m: 5 / 18 for m in "ist"})
    # I_ij = 1/2 (5/6 - 1/2 - 1/2 + 1/6) + 1/2 (1 - 5/6 - 5/6 + 1/2) = -1/12
    assert result.interactions == pytest.approx({p: -1 / 12 for p in [("i", "s"), ("i", "t"), ("s", "t")]})


def test_efficiency_holds_for_every_game_and_symmetric_players_get_equal_values():
    gen = torch.Generator().manual_seed(3)
    players = "abcde"
    subsets = [F(c for i, c in enumerate(players) if mask >> i & 1) for mask in range(1, 32)]
    values = {s: float(torch.rand((), generator=gen)) for s in subsets}
    result = attribute(players, values, empty=0.2)
    assert sum(result.shapley.values()) == pytest.approx(values[F(players)] - 0.2)
    # A player that adds nothing to any coalition (a null player) gets exactly zero.
    null = {s | {"z"}: v for s, v in values.items()} | values | {F("z"): 0.2}
    assert attribute(players + "z", null, empty=0.2).shapley["z"] == pytest.approx(0.0, abs=1e-12)


def test_beyond_the_exact_limit_the_sampled_estimate_is_within_its_stated_error():
    players = [f"m{i}" for i in range(10)]
    weights = {p: (i + 1) / 55 for i, p in enumerate(players)}

    def v(s):  # not additive: a saturating score
        return 1 - math.exp(-2 * sum(weights[p] for p in s))

    exact = attribute(players, v, empty=0.0, exact_max=10)
    sampled = attribute(players, v, empty=0.0)  # 10 > EXACT_MAX: sampled
    assert exact.exact and not sampled.exact
    for p in players:
        assert sampled.stderr[p] > 0
        assert abs(sampled.shapley[p] - exact.shapley[p]) <= 4 * sampled.stderr[p]
    for pair, value in exact.interactions.items():
        assert abs(sampled.interactions[pair] - value) <= 4 * sampled.interaction_stderr[pair] + 1e-12
    assert attribute(players, v, empty=0.0).shapley == sampled.shapley  # a fixed seed: reproducible


def test_a_missing_coalition_is_an_error_that_names_it():
    with pytest.raises(IncompleteGame, match=r"b\+c"):
        attribute("abc", game(a=0.6, b=0.2, c=0.0, ab=0.8, ac=0.6, abc=1.0), empty=0.0)


def evaluation(by, *, pooled=None, clients=None):
    out = {
        "accuracy": 0.9,
        "macro_f1": 0.9,
        "by_modalities": {s: {"accuracy": a, "macro_f1": f, "num_examples": 10} for s, (a, f) in by.items()},
    }
    if pooled is not None:
        out["pooled"] = {
            "accuracy": 0.9,
            "macro_f1": 0.9,
            "by_modalities": {s: {"accuracy": a, "macro_f1": f} for s, (a, f) in pooled.items()},
        }
    if clients is not None:
        out["clients"] = clients
    return out


def test_scores_come_from_pooled_figures_when_results_have_them():
    by = {"image": (0.5, 0.4), "signal": (0.5, 0.4), "image+signal": (0.8, 0.7)}
    scores, source = coalition_scores(evaluation(by), "macro_f1")
    assert source == "client-weighted mean" and scores[F({"image", "signal"})] == 0.7
    pooled = {"image": (0.6, 0.6), "signal": (0.4, 0.4), "image+signal": (0.9, 0.9)}
    scores, source = coalition_scores(evaluation(by, pooled=pooled), "macro_f1")
    assert source == "pooled" and scores == {F({"image"}): 0.6, F({"signal"}): 0.4, F({"image", "signal"}): 0.9}


def test_contributions_overall_per_client_and_a_federation_lacking_a_coalition():
    labels = list("abcd")  # chance 1/4
    by = {"image": (0.75, 0.7), "signal": (0.25, 0.25), "image+signal": (0.75, 0.7)}
    clients = {
        "c1": {"by_modalities": {"image": {"accuracy": 0.75, "macro_f1": 0.7}}},
        "c2": {
            "by_modalities": {
                "image": {"accuracy": 0.5, "macro_f1": 0.5},
                "signal": {"accuracy": 0.5, "macro_f1": 0.5},
                "image+signal": {"accuracy": 1.0, "macro_f1": 1.0},
            }
        },
    }
    found = modality_contributions(evaluation(by, clients=clients), modalities=["image", "signal"], labels=labels)
    acc = found["overall"]["accuracy"]
    assert found["empty_value"] == 0.25 and acc["modalities"] == ["image", "signal"]
    assert acc["shapley"] == pytest.approx({"image": 0.5, "signal": 0.0})  # signal adds nothing
    assert found["clients"]["c1"]["accuracy"]["shapley"] == pytest.approx({"image": 0.5})
    assert found["clients"]["c2"]["accuracy"]["interactions"] == pytest.approx({"image+signal": 0.25})
    # A federation where no sample has image and tabular together: no game for the federation, said why.
    by3 = {
        "image": (0.5, 0.5),
        "signal": (0.5, 0.5),
        "tabular": (0.5, 0.5),
        "image+signal": (0.8, 0.8),
        "signal+tabular": (0.8, 0.8),
    }
    found = modality_contributions(evaluation(by3), modalities=["image", "signal", "tabular"], labels=labels)
    assert "shapley" not in found["overall"]["accuracy"]
    assert "image+tabular, image+signal+tabular" in found["overall"]["accuracy"]["error"]


def test_unimodal_collapse_is_warned_only_when_another_modality_alone_does_well():
    labels = list("abcd")  # chance 0.25
    # image carries everything although signal alone reaches 0.5: collapse by Shapley share: φ_image = 0.7/3 + 0.45/6 + 0.7/6 + 0.45/3 = 0.575 of a 0.7 gain (82 %).
    by = {
        "image": (0.95, 0.9),
        "signal": (0.5, 0.5),
        "tabular": (0.25, 0.2),
        "image+signal": (0.95, 0.9),
        "image+tabular": (0.95, 0.9),
        "signal+tabular": (0.5, 0.5),
        "image+signal+tabular": (0.95, 0.9),
    }
    found = modality_contributions(evaluation(by), modalities=["image", "signal", "tabular"], labels=labels)
    assert found["overall"]["accuracy"]["shapley"]["image"] / 0.7 > COLLAPSE_SHARE
    assert len(found["warnings"]) == 1
    assert "image takes 82% of the gain" in found["warnings"][0] and "signal alone reaches 0.50" in found["warnings"][0]
    # The same game, but signal alone is near chance: no other modality has anything to offer, no warning.
    weak = by | {"signal": (0.3, 0.3), "signal+tabular": (0.3, 0.3)}
    assert modality_contributions(evaluation(weak), modalities=["image", "signal", "tabular"], labels=labels)["warnings"] == []
    # Attention fusion: the head's own weights decide (90 % on image), although the game is balanced.
    balanced = evaluation({"image": (0.6, 0.6), "signal": (0.6, 0.6), "image+signal": (0.9, 0.9)})
    balanced["attention"] = {
        "image": {"0": {"mean": 0.95, "samples": 10}, "1": {"mean": 0.85, "samples": 10}},
        "signal": {"0": {"mean": 0.05, "samples": 10}, "1": {"mean": 0.15, "samples": 10}},
    }
    found = modality_contributions(balanced, modalities=["image", "signal"], labels=labels)
    assert len(found["warnings"]) == 1 and "image takes 90% of the attention" in found["warnings"][0]
    assert found["attention"] == {"image": {"a": 0.95, "b": 0.85}, "signal": {"a": 0.05, "b": 0.15}}


def test_per_class_contributions_come_from_confusion_matrices():
    labels = ["x", "y"]
    # image tells x apart, signal tells y apart; rows: true class, columns: predicted.
    conf = {"image": [[10, 0], [5, 5]], "signal": [[5, 5], [0, 10]], "image+signal": [[10, 0], [0, 10]]}
    ev = {"by_modalities": {s: {"accuracy": 0.75, "macro_f1": 0.7, "confusion": m} for s, m in conf.items()}}
    ev["by_modalities"]["image+signal"] |= {"accuracy": 1.0, "macro_f1": 1.0}
    found = modality_contributions(ev, modalities=["image", "signal"], labels=labels)
    recall = found["per_class"]["accuracy"]
    # class x: v(image) = 1, v(signal) = 0.5, v(both) = 1, chance 0.5: image 0.5, signal 0
    assert recall["x"]["shapley"] == pytest.approx({"image": 0.5, "signal": 0.0})
    assert recall["y"]["shapley"] == pytest.approx({"image": 0.0, "signal": 0.5})


def test_attribution_json_is_plain():
    result = attribute("ab", game(a=0.5, b=0.3, ab=0.9), empty=0.1)
    doc = result.to_json()
    assert doc["interactions"] == pytest.approx({"a+b": 0.2}) and doc["exact"] is True and "stderr" not in doc
    assert isinstance(result, Attribution)


def test_on_the_synthetic_dataset_each_class_is_credited_to_the_modality_that_generates_it():
    """A model trained (without DP, in process) on the synthetic data, whose modalities each tell two classes apart."""
    from common.data import synthetic
    from common.data.samples import hide_modalities, modality_subsets, subset_key
    from common.insight.attention import attention_metrics, pool
    from common.model.evaluation import evaluate, predict
    from common.model.multimodal import ModelConfig, MultimodalModel

    train, test = synthetic.generate(1200, seed=21), synthetic.generate(600, seed=22)
    names, labels = list(train.schema.names), list(synthetic.LABELS)
    model = MultimodalModel(train.schema, ModelConfig(), seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        for batch in torch.randperm(len(train), generator=gen).split(64):
            mask = hide_modalities(train.mask[batch], 0.5, gen)  # learn every subset
            loss = torch.nn.functional.cross_entropy(
                model({n: x[batch] for n, x in train.inputs.items()}, mask), train.labels[batch]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    report = evaluate(model, test)
    # Per-class counts per subset, as results.json holds them when the evaluation releases them
    for subset in modality_subsets(names):
        only = torch.zeros_like(test.mask)
        only[:, [names.index(n) for n in subset]] = True
        pred = predict(model, test, only)
        confusion = torch.zeros((6, 6), dtype=torch.int64).index_put_((test.labels, pred), torch.tensor(1), accumulate=True)
        report["by_modalities"][subset_key(subset)]["confusion"] = confusion.tolist()
    report["attention"] = pool([attention_metrics(model, test)])
    found = modality_contributions(report, modalities=names, labels=labels)

    overall = found["overall"]["accuracy"]
    assert overall["full"] > 0.9
    assert all(phi > 0.15 for phi in overall["shapley"].values()), overall["shapley"]
    for c, label in enumerate(labels):
        generator = next(m for m, views in synthetic.VIEWS.items() if views[c] < 2)  # the modality that tells c apart
        recall = found["per_class"]["accuracy"][label]["shapley"]
        assert max(recall, key=recall.get) == generator, (label, recall)
        weights = {m: found["attention"][m][label] for m in names}
        assert max(weights, key=weights.get) == generator, (label, weights)


def test_pooled_per_class_counts_give_per_class_contributions():
    """results.json's pooled figures: per subset, per-class counts (true examples, predictions, correct ones)."""

    def counts(support, predicted, correct):
        return {
            "accuracy": sum(correct) / sum(support),
            "macro_f1": 0.5,
            "num_examples": sum(support),
            "per_class": {"support": support, "predicted": predicted, "correct": correct},
        }

    ev = {
        "pooled": {
            "accuracy": 1.0,
            "macro_f1": 1.0,
            "by_modalities": {
                "image": counts([10, 10], [15, 5], [10, 5]),  # x: recall 1, y: 0.5
                "signal": counts([10, 10], [5, 15], [5, 10]),
                "image+signal": counts([10, 10], [10, 10], [10, 10]),
            },
        },
        "client_mean": {"accuracy": 0.7, "macro_f1": 0.6, "by_modalities": {}},
    }
    found = modality_contributions(ev, modalities=["image", "signal"], labels=["x", "y"])
    assert found["source"] == "pooled"
    assert found["per_class"]["accuracy"]["x"]["shapley"] == pytest.approx({"image": 0.5, "signal": 0.0})
    # y's F1 alone with image: 2 * 5 / (10 + 5) = 2/3; with signal 2 * 10 / (10 + 15) = 0.8; together 1; chance 1/2
    f1 = found["per_class"]["macro_f1"]["y"]["shapley"]
    assert f1 == pytest.approx({"image": ((2 / 3 - 0.5) + (1 - 0.8)) / 2, "signal": ((0.8 - 0.5) + (1 - 2 / 3)) / 2})
    # Without pooled figures: the clients' mean
    mean_only = {"pooled": None, "client_mean": {"accuracy": 0.7, "by_modalities": {"image": {"accuracy": 0.7, "macro_f1": 0.6}}}}
    scores, source = coalition_scores(mean_only, "accuracy")
    assert source == "client-weighted mean" and scores == {F({"image"}): 0.7}
