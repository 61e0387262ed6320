"""The benchmarks' modality contributions: aggregated over seeds from results.json files, tabled and plotted."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from common.insight.contributions import modality_contributions
from common.model.evaluation import scores_from_counts
from simulations.bench import _contributions as K
from simulations.bench import av_digits, hapt

LABELS = ["walk", "sit", "stand", "lie"]  # chance 1/4
MODALITIES = ["acc", "gyro"]
SUPPORT = [10, 10, 10, 10]

# Correct predictions per class for each modality subset. Run A: v(acc) = 0.55, v(gyro) = 0.35, v(both) = 0.85,
# so Shapley acc = ((0.55 - 0.25) + (0.85 - 0.35)) / 2 = 0.40, gyro = ((0.35 - 0.25) + (0.85 - 0.55)) / 2 = 0.20,
# interaction = 0.85 - 0.55 - 0.35 + 0.25 = 0.20. Run B: 0.65 / 0.25 / 0.75 -> 0.45, 0.05, 0.10.
RUN_A = {"acc": [10, 2, 5, 5], "gyro": [2, 10, 1, 1], "acc+gyro": [10, 10, 7, 7]}
RUN_B = {"acc": [10, 2, 9, 5], "gyro": [2, 8, 0, 0], "acc+gyro": [10, 10, 5, 5]}
# acc takes (0.9 - 0.25 + 0.925 - 0.55) / 2 / (0.925 - 0.25) = 76 % of the gain while gyro alone scores 0.55 > 0.25 + 0.2
COLLAPSED = {"acc": [10, 10, 8, 8], "gyro": [10, 6, 3, 3], "acc+gyro": [10, 10, 9, 8]}


def _evaluation(correct_by_subset: dict[str, list[int]]) -> dict:
    """One round's evaluate entry as the server writes it: pooled per-class counts by subset, one client's scores."""
    by = {}
    for subset, correct in correct_by_subset.items():
        predicted = list(correct)
        predicted[3] += sum(SUPPORT) - sum(correct)  # every mistake predicts "lie"
        by[subset] = scores_from_counts(SUPPORT, predicted, correct) | {
            "per_class": {"support": SUPPORT, "predicted": predicted, "correct": correct}
        }
    full = by["acc+gyro"] if "acc+gyro" in by else next(iter(by.values()))
    mean_by = {s: {k: v[k] for k in ("accuracy", "macro_f1", "num_examples")} for s, v in by.items()}
    return {
        "num_examples": 40,
        "pooled": {**full, "by_modalities": by},
        "client_mean": {**{k: full[k] for k in ("accuracy", "macro_f1")}, "by_modalities": mean_by},
        "clients": {"site-a": {"accuracy": full["accuracy"], "by_modalities": mean_by}},
    }


def _write_run(folder: Path, correct_by_subset: dict[str, list[int]], *, source: str, stored: bool = True) -> dict:
    """A completed run's results.json (contributions stored as the server stores them, or left for the reader to
    compute as in results written before fedfuse had them); returns it as read back from the file."""
    evaluation = _evaluation(correct_by_subset)
    if stored:
        evaluation["modality_contributions"] = modality_contributions(evaluation, modalities=MODALITIES, labels=LABELS)
    key = K.ROUND_KEYS[source]
    results = {
        "status": "completed",
        "federation": {"modalities": MODALITIES, "labels": LABELS},
        "rounds": [{"round": 1, key: evaluation}],
        "final": None,
        "final_server_evaluate": None,
        source: evaluation,
        "privacy": {"clients": {}},
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return json.loads((folder / "results.json").read_text())


def test_seeds_aggregate_to_mean_and_sample_std_of_hand_computed_values(tmp_path):
    # Prepare: two seeds; the second results.json lacks stored contributions (computed on reading)
    runs = {
        "fed-p0-eps8-s0": _write_run(tmp_path / "s0", RUN_A, source="final_server_evaluate"),
        "fed-p0-eps8-s1": _write_run(tmp_path / "s1", RUN_B, source="final_server_evaluate", stored=False),
    }

    # Execute
    found = K.aggregate(runs, "final_server_evaluate")

    # Assert
    acc = found["overall"]["accuracy"]
    assert found["runs"] == 2 and acc["runs"] == 2 and acc["empty"] == pytest.approx(0.25)
    assert acc["shapley"]["acc"]["values"] == pytest.approx([0.40, 0.45])
    assert acc["shapley"]["acc"]["mean"] == pytest.approx(0.425)
    assert acc["shapley"]["acc"]["std"] == pytest.approx(0.05 / math.sqrt(2))
    assert acc["shapley"]["gyro"]["mean"] == pytest.approx(0.125)
    assert acc["interactions"]["acc+gyro"]["values"] == pytest.approx([0.20, 0.10])
    assert acc["full"]["mean"] == pytest.approx(0.80)
    assert acc["alone"]["gyro"]["values"] == pytest.approx([0.35, 0.25])
    assert acc["share"]["acc"]["values"] == pytest.approx([0.40 / 0.60, 0.45 / 0.50])
    # efficiency survives the averaging: mean Shapley values add up to mean v(all) - v(∅)
    assert sum(s["mean"] for s in acc["shapley"].values()) == pytest.approx(acc["full"]["mean"] - 0.25)
    assert "macro_f1" in found["overall"] and found["overall"]["macro_f1"]["runs"] == 2
    assert found["clients"]["site-a"]["accuracy"]["shapley"]["acc"]["mean"] == pytest.approx(0.425)
    assert found["warnings"] == {"final": [], "runs_warned_final": 0, "rounds_warned": {}}


def test_per_class_values_name_the_modality_each_class_leans_on(tmp_path):
    # Prepare: walk is told apart by acc (recall 1 vs 0.2), sit by gyro
    runs = {
        "a-s0": _write_run(tmp_path / "s0", RUN_A, source="final"),
        "a-s1": _write_run(tmp_path / "s1", RUN_B, source="final"),
    }

    # Execute
    found = K.aggregate(runs)
    table = K.class_table(found, "accuracy")

    # Assert: walk: acc ((1 - 0.25) + (1 - 0.2)) / 2 = 0.775, gyro ((0.2 - 0.25) + 0) / 2 = -0.025 in both seeds
    walk = found["per_class"]["accuracy"]["walk"]
    assert walk["shapley"]["acc"]["mean"] == pytest.approx(0.775) and walk["shapley"]["acc"]["std"] == pytest.approx(0.0)
    assert walk["shapley"]["gyro"]["mean"] == pytest.approx(-0.025)
    sit = found["per_class"]["accuracy"]["sit"]  # gyro: 0.775 (A), ((0.8 - 0.25) + (1 - 0.2)) / 2 = 0.675 (B)
    assert sit["shapley"]["gyro"]["values"] == pytest.approx([0.775, 0.675])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["walk"].endswith("| acc (103 %) |")  # 0.775 of a 0.75 gain: gyro's value is negative
    assert "| gyro (" in rows["sit"]
    assert "+77.5 ± 0.0" in rows["walk"] and "-2.5 ± 0.0" in rows["walk"]
    assert K.pm({"mean": 0.31, "std": 0.0, "values": [0.31]}) == "+31.0"  # one run: no spread to show


def test_tables_print_points_and_the_collapse_warnings(tmp_path):
    # Prepare: one setting of two seeds, one collapsed run
    runs = {
        "ok-s0": _write_run(tmp_path / "s0", RUN_A, source="final"),
        "ok-s1": _write_run(tmp_path / "s1", RUN_B, source="final"),
        "bad-s0": _write_run(tmp_path / "b0", COLLAPSED, source="final"),
    }

    # Execute
    found = K.by_setting(runs, {"ok": ["ok-s0", "ok-s1"], "bad": ["bad-s0"]})
    table = K.overall_table([("ok", found["ok"]), ("bad", found["bad"])], "accuracy")
    warnings = K.warnings_text([("ok", found["ok"]), ("bad", found["bad"])])

    # Assert
    header, _, ok, bad = table.splitlines()
    assert header == (
        "| setting | accuracy, all modalities | acc alone | gyro alone | Shapley acc | Shapley gyro "
        "| interaction acc+gyro | collapse warnings (final / any round) | seeds |"
    )
    assert ok == "| ok | 80.0 ± 7.1 | 60.0 ± 7.1 | 30.0 ± 7.1 | +42.5 ± 3.5 | +12.5 ± 10.6 | +15.0 ± 7.1 | 0 / 0 of 2 | 2 |"
    assert bad.endswith("| 1 / 1 of 1 | 1 |")
    assert found["bad"]["warnings"]["rounds_warned"] == {"bad-s0": [1]}
    assert warnings.startswith("- bad: unimodal collapse: acc takes 76% of the gain in held-out accuracy")
    assert K.warnings_text([("ok", found["ok"])]) == "No run raised a unimodal-collapse warning in its final round."


def test_a_run_without_a_needed_subset_is_counted_with_its_reason(tmp_path):
    # Prepare: the second seed has no held-out score for gyro alone
    runs = {
        "s0": _write_run(tmp_path / "s0", RUN_A, source="final"),
        "s1": _write_run(tmp_path / "s1", {k: v for k, v in RUN_B.items() if k != "gyro"}, source="final"),
    }

    # Execute
    game = K.aggregate(runs)["overall"]["accuracy"]

    # Assert: the figures are those of the complete run; the other is counted, with the evaluation's reason
    assert game["runs"] == 1 and game["failed"] == 1
    assert game["shapley"]["acc"]["values"] == pytest.approx([0.40])
    assert game["errors"] == ["no held-out score for gyro: no evaluated sample has those modalities together"]
    assert K.aggregate({"x": {"final": None}}) is None


def test_hapt_summary_uses_the_test_subjects_for_federated_settings_and_draws_the_plot(tmp_path):
    # Prepare: a federated setting (server-scored test subjects) and a local one (clients' held-out windows)
    runs = {
        "fed-p0-eps8-s0": _write_run(tmp_path / "f0", RUN_A, source="final_server_evaluate"),
        "fed-p0-eps8-s1": _write_run(tmp_path / "f1", RUN_B, source="final_server_evaluate"),
        "local-p0-epsinf-s0": _write_run(tmp_path / "l0", COLLAPSED, source="final"),
    }
    for name in ("fed-p0-eps8-s0", "fed-p0-eps8-s1"):  # the clients' own held-out figures are there too
        runs[name]["final"] = _evaluation(COLLAPSED)
    settings = {
        "fed-p0-eps8": {"encoders": "federated", "p": 0.0, "budget": 8.0, "runs": ["fed-p0-eps8-s0", "fed-p0-eps8-s1"]},
        "local-p0-epsinf": {"encoders": "local", "p": 0.0, "budget": math.inf, "runs": ["local-p0-epsinf-s0"]},
    }
    args = argparse.Namespace(dropout_epsilon=8.0)

    # Execute
    found = hapt.contributions(runs, settings)
    key = hapt.per_class_setting(found, args)
    figure = K.plot(
        [(hapt.setting_label(settings[k]), v) for k, v in found.items()],
        tmp_path / "hapt-contributions.png",
        per_class=(hapt.setting_label(settings[key]), found[key]),
        title="HAPT",
    )
    text = hapt.contribution_tables(found, settings, args, figure.name)

    # Assert
    assert found["fed-p0-eps8"]["source"] == "final_server_evaluate" and found["local-p0-epsinf"]["source"] == "final"
    assert found["fed-p0-eps8"]["overall"]["accuracy"]["shapley"]["acc"]["mean"] == pytest.approx(0.425)
    assert key == "fed-p0-eps8"
    assert "| federated, p = 0, ε = 8 (test subjects) | 80.0 ± 7.1 |" in text
    assert "| local, p = 0, ε = ∞ (clients' held-out windows) |" in text
    assert "### Per class: federated, p = 0, ε = 8 (test subjects), recall" in text
    assert "![modality contributions](hapt-contributions.png)" in text
    assert "- local, p = 0, ε = ∞ (clients' held-out windows): unimodal collapse: acc" in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_av_digits_rows_add_the_clients_holding_both_modalities(tmp_path):
    # Prepare: the mixed federation; its clients' own scores give per-client attributions
    runs = {
        "mixed-s0": _write_run(tmp_path / "m0", RUN_A, source="final"),
        "mixed-s1": _write_run(tmp_path / "m1", RUN_B, source="final"),
    }
    for r in runs.values():  # a client holding one modality only: not a row
        r["final"]["modality_contributions"]["clients"]["site-b"] = modality_contributions(
            {"by_modalities": {"acc": {"accuracy": 0.5, "macro_f1": 0.4}}}, modalities=MODALITIES, labels=LABELS
        )["overall"]
    settings = {"mixed": {"runs": ["mixed-s0", "mixed-s1"]}}

    # Execute
    found = av_digits.contributions(runs, settings)
    rows = av_digits.multimodal_clients(found["mixed"])
    text = av_digits.contribution_tables(found, None)

    # Assert
    assert [label for label, _ in rows] == ["mixed, site-a"]
    assert "| mixed, site-a | 80.0 ± 7.1 |" in text
    assert "### Per class (digit), mixed federation, recall (pooled)" in text
    assert "site-b" not in text


def test_the_summary_links_each_runs_report(tmp_path, capsys):
    # Prepare
    from simulations.bench import _common as C

    runs = {
        "mixed-s0": {"bench_seconds": 10.0, "privacy": {"clients": {}}},
        "mixed-s1": {"bench_seconds": 12.0, "privacy": {"clients": {}}},
    }

    # Execute
    status = C.finish(
        tmp_path,
        "av-digits",
        "AV-Digits",
        started=0.0,
        runs=runs,
        body="## Tables",
        payload={"runs": {n: {"epsilon_ok": True} for n in runs}},
    )

    # Assert: the JSON and the markdown name each run's report.html, relative to the output folder
    assert status == 0
    summary = json.loads((tmp_path / "av-digits-results.json").read_text())
    assert summary["reports"] == {"mixed-s0": "runs/mixed-s0/report.html", "mixed-s1": "runs/mixed-s1/report.html"}
    markdown = (tmp_path / "av-digits-results.md").read_text()
    assert "[mixed-s0](runs/mixed-s0/report.html), [mixed-s1](runs/mixed-s1/report.html)" in markdown
    assert "## Tables" in capsys.readouterr().out


def test_leans_on_names_ties_and_classes_no_modality_helps():
    def game(acc, gyro, full):
        return {
            "shapley": {"acc": {"mean": acc}, "gyro": {"mean": gyro}},
            "share": {"acc": {"mean": acc / (full - 0.25)}, "gyro": {"mean": gyro / (full - 0.25)}},
        }

    assert K.leans_on(game(0.30, 0.10, 0.65)) == "acc (75 %)"
    assert K.leans_on(game(0.20, 0.20, 0.65)) == "acc = gyro"
    assert K.leans_on(game(-0.083, -0.083, 0.0)) == "none"  # the class is never recognised: nothing to lean on
    assert K.leans_on({}) == "-"
