"""Real-data benchmarks: the bench helpers, and 2-round simulations on HAPT and AV-Digits (slow; need ../shared/data)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from simulations.bench import _common as C
from simulations.bench import av_digits, hapt

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDFUSE_SHARED_DATA", REPO.parent / "shared" / "data"))
SCENARIOS = REPO / "simulations" / "scenarios"


def _needs(*parts: str) -> None:
    missing = [p for p in parts if not (DATA / p).exists()]
    if missing:
        pytest.skip(f"real data not found: {', '.join(str(DATA / p) for p in missing)} (set FEDFUSE_SHARED_DATA)")


def _simulate(scenario: str, overrides: list[str], out: Path) -> dict:
    """One in-process Flower simulation of a scenario file; its results.json."""
    from common.config import parse_run_config
    from common.data.partition import num_clients
    from simulations import runner
    from simulations.scenario import build_config

    flat = build_config(SCENARIOS / scenario, overrides + ["num-server-rounds=2", "min-clients=2"])
    flat["out-dir"] = str(out)
    runner.run(flat, num_clients=num_clients(parse_run_config(flat)), out_dir=out)
    return json.loads((out / "results.json").read_text())


def _assert_budgets_kept(results: dict) -> None:
    clients = results["privacy"]["clients"]
    assert clients
    for cid, c in clients.items():
        assert c["rounds_trained"] == 2, cid
        assert 0 < c["epsilon"] <= c["budget"], (cid, c)


# --- helpers (fast) -------------------------------------------------------------------------------
def test_mean_std_is_sample_std():
    # Prepare / Execute
    mean, std = C.mean_std([0.8, 0.9, 1.0])

    # Assert
    assert mean == pytest.approx(0.9)
    assert std == pytest.approx(0.1)
    assert C.pm([0.8, 0.9, 1.0]) == "90.0 ± 10.0"
    assert C.mean_std([0.5]) == (0.5, 0.0)
    assert C.mean_std([math.inf, math.inf]) == (math.inf, 0.0)  # non-private runs' epsilon


def test_epsilon_list_parses_inf_and_refuses_nonsense():
    assert C.epsilon_list("inf, 8,3") == [math.inf, 8.0, 3.0]
    with pytest.raises(Exception, match="positive numbers"):
        C.epsilon_list("0,8")


def test_hapt_cells_cover_the_matrix(tmp_path):
    # Prepare
    args = argparse.Namespace(seeds=2, epsilons="inf,8,3,1", drop_probs="0,0.3,0.5", dropout_epsilon=8.0, local_epsilons="inf,8")

    # Execute
    cells = hapt.cells(args, tmp_path)

    # Assert: per seed 4 budgets at p = 0, 2 dropout rates at ε = 8, 2 personalised runs
    assert len(cells) == 2 * (4 + 2 + 2)
    names = [c.name for c in cells if c.seed == 1]
    assert names == [
        "fed-p0-epsinf-s1",
        "fed-p0-eps8-s1",
        "fed-p0-eps3-s1",
        "fed-p0-eps1-s1",
        "fed-p0.3-eps8-s1",
        "fed-p0.5-eps8-s1",
        "local-p0-epsinf-s1",
        "local-p0-eps8-s1",
    ]
    p5 = next(c for c in cells if c.name == "fed-p0.5-eps8-s0")
    assert p5.overrides == {
        "encoders": "federated",
        "data.server-test": str(tmp_path),
        "data.modality-drop-prob": 0.5,
        "dp.epsilon": 8.0,
    }


def test_the_model_of_a_finished_non_private_run_is_read_back_from_its_results():
    from common.config import RunConfig
    from common.fileio import json_safe

    # Prepare: a non-private run's flat config as results.json holds it (dp.epsilon = inf written as null)
    config = RunConfig().to_flat() | {"dp.epsilon": math.inf, "model.fusion": "concat", "model.embed-dim": 64}
    saved = json.loads(json.dumps(json_safe(config)))
    assert saved["dp.epsilon"] is None
    # Execute
    model = hapt.saved_model_config(saved)
    # Assert: the model configuration comes back whole (the bench scored the ∞ runs with it; it crashed here before)
    assert (model.fusion, model.embed_dim) == ("concat", 64)


def test_hapt_targets_are_issue_11s_per_budget_with_the_eps3_spread():
    # Prepare: figures like the cosine-schedule run of docs/benchmarks.md (ε = 3 spread 1.0 point), no p > 0 cells
    def setting(*values: float) -> dict:
        return {"test_macro_f1": {"values": list(values)}}

    st = {
        "fed-p0-epsinf": setting(0.915, 0.92, 0.91),
        "fed-p0-eps8": setting(0.78, 0.779, 0.777),
        "fed-p0-eps3": setting(0.86, 0.85, 0.87),
        "fed-p0-eps1": setting(0.631, 0.619, 0.619),
    }
    args = argparse.Namespace(dropout_epsilon=8.0)
    # Execute
    verdicts = {v["target"]: v["met"] for v in hapt.targets(st, args)}
    # Assert: one target per budget, the ε = 3 spread, and "not run" (None) where no cell ran
    assert verdicts["non-private: test-subject macro-F1 >= 90 at p = 0"] is True
    assert verdicts["ε = 8: test-subject macro-F1 >= 88 at p = 0"] is False
    assert verdicts["ε = 3: test-subject macro-F1 >= 85 at p = 0"] is True
    assert verdicts["ε = 1: test-subject macro-F1 >= 70 at p = 0"] is False
    assert verdicts["ε = 3: seed spread (sample std) under 2 points"] is True
    assert verdicts["p = 0.5 at most 3 points below p = 0 (ε = 8)"] is None
    st["fed-p0-eps3"] = setting(0.80, 0.73, 0.76)
    assert {v["target"]: v["met"] for v in hapt.targets(st, args)}["ε = 3: seed spread (sample std) under 2 points"] is False


def test_av_digits_mixed_groups_follow_site_order(tmp_path):
    # Prepare: site folders sort by name, as load_federation walks them
    for name in ("speaker-theo", "speaker-george", "speaker-yweweler", "speaker-lucas", "speaker-jackson", "speaker-nicolas"):
        (tmp_path / name).mkdir()

    # Execute
    assigned = av_digits.assignment(tmp_path, av_digits.MIXED_GROUPS)

    # Assert
    assert assigned == {
        "speaker-george": "image",
        "speaker-jackson": "image",
        "speaker-lucas": "audio",
        "speaker-nicolas": "audio",
        "speaker-theo": "audio+image",
        "speaker-yweweler": "audio+image",
    }


# --- real data (slow) -----------------------------------------------------------------------------
@pytest.mark.slow
def test_hapt_two_rounds_on_real_data(tmp_path):
    """Six training subjects + three test subjects of HAPT, federated encoders, ε = 8, p = 0.3, two rounds."""
    _needs("hapt/RawData/labels.txt")
    from common.data.importers.hapt import import_hapt
    from common.data.site_folders import load_site

    # Prepare: import, then a federation of 6 training subjects and 3 test-only subjects (keeps it under 2 min)
    sites = tmp_path / "hapt"
    import_hapt(DATA / "hapt", sites, classes=6)
    fed = tmp_path / "fed"
    fed.mkdir()
    for name in (
        "subject-01",
        "subject-03",
        "subject-05",
        "subject-06",
        "subject-07",
        "subject-08",
        "subject-02",
        "subject-04",
        "subject-09",
    ):  # 02, 04, 09: the publisher's test subjects
        (sites / name).rename(fed / name)

    # Execute
    results = _simulate(
        "hapt.toml",
        [
            f"data.dataset={json.dumps(str(fed))}",
            f"data.server-test={json.dumps(str(fed))}",
            'encoders="federated"',
            "data.modality-drop-prob=0.3",
            "dp.epsilon=8.0",
        ],
        tmp_path / "run",
    )

    # Assert: completed; 6 clients; the server scored the 3 test subjects above chance (1/6); budgets kept
    assert results["status"] == "completed"
    assert len(results["privacy"]["clients"]) == 6
    server = results["final_server_evaluate"]
    assert server["num_examples"] == sum(len(load_site(fed / s).part("test")) for s in ("subject-02", "subject-04", "subject-09"))
    assert server["pooled"]["accuracy"] > 1 / 6
    assert results["final"]["pooled"]["accuracy"] > 1 / 6
    _assert_budgets_kept(results)
    # The benchmark's contributions come from the test subjects: both modalities, every class, efficiency kept
    settings = {"fed-p0.3-eps8": {"encoders": "federated", "p": 0.3, "budget": 8.0, "runs": ["run"]}}
    found = hapt.contributions({"run": results}, settings)["fed-p0.3-eps8"]
    game = found["overall"]["accuracy"]
    assert found["source"] == "final_server_evaluate" and game["modalities"] == ["acc", "gyro"]
    assert sum(s["mean"] for s in game["shapley"].values()) == pytest.approx(server["pooled"]["accuracy"] - 1 / 6)
    assert sorted(found["per_class"]["accuracy"]) == sorted(results["federation"]["labels"])


@pytest.mark.slow
def test_av_digits_two_rounds_on_real_data(tmp_path):
    """All six speakers of AV-Digits, mixed modalities (2 image, 2 audio, 2 both), ε = 8, two rounds."""
    _needs("fsdd/recordings", "mnist/t10k-images-idx3-ubyte.gz")
    from common.data.importers.av_digits import import_av_digits

    # Prepare
    sites = tmp_path / "av"
    import_av_digits(DATA / "fsdd", DATA / "mnist", sites)

    # Execute
    results = _simulate(
        "av-digits.toml", [f"data.dataset={json.dumps(str(sites))}", "dp.epsilon=8.0", "train.local-epochs=8"], tmp_path / "run"
    )

    # Assert: every subset scored on the right clients' test takes; above chance (1/10) overall; budgets kept
    assert results["status"] == "completed"
    by = results["final"]["pooled"]["by_modalities"]
    assert {k: v["num_examples"] for k, v in by.items()} == {"audio": 200, "image": 200, "audio+image": 100}
    assert results["final"]["pooled"]["accuracy"] > 0.1
    modalities = {cid: "+".join(c["modalities"]) for cid, c in results["privacy"]["clients"].items()}
    assert modalities == {
        "speaker-george": "image",
        "speaker-jackson": "image",
        "speaker-lucas": "audio",
        "speaker-nicolas": "audio",
        "speaker-theo": "audio+image",
        "speaker-yweweler": "audio+image",
    }
    _assert_budgets_kept(results)
    # The benchmark's per-client contribution rows: the two speakers holding both modalities
    found = av_digits.contributions({"mixed-s0": results}, {"mixed": {"runs": ["mixed-s0"]}})["mixed"]
    assert [label for label, _ in av_digits.multimodal_clients(found)] == ["mixed, speaker-theo", "mixed, speaker-yweweler"]
    assert found["overall"]["accuracy"]["modalities"] == ["audio", "image"]
