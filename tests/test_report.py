"""The run report: drawn from run folders that the real server strategy wrote with the real client handlers
(in process, no Ray), checked as data and in a real headless browser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from browser_helpers import find_browser, load_page
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from client.handlers import handle_evaluate, handle_train
from common.config import RunConfig, parse_run_config
from common.data.partition import federation_space, num_clients
from common.insight.report import render, write_report
from common.model.multimodal import ModelConfig, global_head_template
from fedfuse.cli import main
from server.optimizer import ServerOptimizer
from server.run_folder import RunFolder
from server.strategy import FedFuse, RunState

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = {"data.samples-per-client": 200, "train.batch-size": 50, "min-clients": 1}


class Grid:
    """The edge not started here: which nodes are connected (the messages go straight to the handlers)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def federate(out: Path, rounds: int, *, fail: tuple[int, int] | None = None, **overrides) -> Path:
    """A run in process: the server strategy and the clients' handlers, messages passed by hand.

    ``fail = (round, node)``: that node's ClientApp raises in that training round.
    """
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what Flower's runtime sets
    flat = parse_run_config(
        RunConfig().to_flat() | SMALL | {"out-dir": str(out), "num-server-rounds": rounds} | overrides
    ).to_flat()
    config = parse_run_config(flat)
    modalities, labels = federation_space(config)
    folder = RunFolder(out)
    run_id = folder.open_run(flat)
    head = global_head_template(
        modalities, len(labels), ModelConfig(config.model.fusion, config.model.embed_dim, config.model.hidden_dim)
    )
    strategy = FedFuse(
        config,
        RunState(run_id, rounds, 0, head),
        ServerOptimizer(),
        folder,
        {"modalities": list(modalities), "labels": list(labels)},
    )
    n = num_clients(config)
    grid = Grid(range(1, n + 1))
    contexts = {
        node: Context(
            run_id=5,
            node_id=node,
            node_config={"partition-id": node - 1, "num-partitions": n},
            state=RecordDict(),
            run_config=flat,
        )
        for node in grid.nodes
    }
    for rnd in range(1, rounds + 1):
        replies = []
        for message in strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid):
            node = message.metadata.dst_node_id
            if fail == (rnd, node):
                replies.append(
                    Message(Error(code=0, reason="ClientApp raised OSError: no space left on device"), reply_to=message)
                )
            else:
                replies.append(handle_train(message, contexts[node]))
        strategy.aggregate_train(rnd, replies)
        evaluations = [
            handle_evaluate(m, contexts[m.metadata.dst_node_id])
            for m in strategy.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), grid)
        ]
        strategy.aggregate_evaluate(rnd, evaluations)
        strategy.end_round(rnd, ArrayRecord())
    return out


@pytest.fixture(scope="module")
def failed_client_run(tmp_path_factory):
    """Three clients (image+signal, signal, image), two rounds; client-01's app raises in round 2."""
    return federate(
        tmp_path_factory.mktemp("report") / "failed-client",
        2,
        fail=(2, 2),
        **{"data.num-clients": 3, "data.groups": "image+signal;signal;image"},
    )


@pytest.fixture(scope="module")
def one_modality_run(tmp_path_factory):
    return federate(
        tmp_path_factory.mktemp("report") / "one-modality",
        1,
        **{"data.num-clients": 2, "data.groups": "tabular;tabular", "model.fusion": "concat"},
    )


def test_results_carry_contributions_per_round_and_the_failure(failed_client_run):
    results = json.loads((failed_client_run / "results.json").read_text())
    assert list(results["rounds"][1]["train"]["failed"]) == ["client-01"]  # by site name, with a category
    for entry in [r["evaluate"] for r in results["rounds"]] + [results["final"]]:
        mc = entry["modality_contributions"]
        acc = mc["overall"]["accuracy"]
        assert mc["empty_value"] == pytest.approx(1 / 6) and acc["modalities"] == ["image", "signal"]
        assert sum(acc["shapley"].values()) == pytest.approx(acc["full"] - 1 / 6)
        assert set(mc["clients"]) == {"client-00", "client-01", "client-02"}
        assert set(mc["attention"]) == {"image", "signal"}  # attention fusion, from client-00's two-modality samples
    assert "shapley" in results["final"]["modality_contributions"]["clients"]["client-00"]["accuracy"]


def test_the_page_shows_every_part_of_the_run(failed_client_run):
    page = render(failed_client_run)
    for part in (
        "Held-out scores per round",
        "Modality contributions",
        "Interactions between pairs",
        "mean attention weight per class",
        "Clients and privacy",
        "Rounds",
        "verified",
        "image × signal",
    ):
        assert part in page, part
    rounds = page[page.index('id="rounds"') :].split("</table>")[0].split("<tr")[2:]  # body rows of the rounds table
    first, second = rounds
    assert "client-01" not in first and 'class="problem"' not in first
    assert (
        second.startswith(' class="problem"') and "<td><b>client-01</b>: app-error</td>" in second
    )  # failed, in its column, with its category
    assert "default-src 'none'" in page  # the browser may fetch nothing
    assert "http://" not in page.replace("http://www.w3.org/", "") and "https://" not in page  # (SVG namespaces only)


def test_the_audit_verdict_on_the_page_is_the_audits(failed_client_run, tmp_path):
    import shutil

    run = shutil.copytree(failed_client_run, tmp_path / "run")
    ledger = run / "ledgers" / "client-02.jsonl"
    ledger.write_text(ledger.read_text().replace('"status":"trained"', '"status":"refused-budget"', 1))
    page = render(run)
    row = page[page.index("<b>client-02</b>") :].split("</tr>")[0]
    assert "tampering" in row and "verified" not in row


def test_fedfuse_report_writes_the_page_and_refuses_a_folder_without_results(failed_client_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(failed_client_run), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_run_with_one_modality_reports_it_as_the_whole_gain(one_modality_run):
    results = json.loads((one_modality_run / "results.json").read_text())
    acc = results["final"]["modality_contributions"]["overall"]["accuracy"]
    assert acc["shapley"] == {"tabular": pytest.approx(acc["full"] - 1 / 6)} and acc["interactions"] == {}
    assert "attention" not in results["final"]["modality_contributions"]  # concat fusion has none
    page = render(one_modality_run)
    assert "Interactions between pairs" not in page and "tabular" in page


@pytest.mark.parametrize("run", ["failed_client_run", "one_modality_run"])
def test_the_page_loads_in_a_real_browser_without_errors_or_requests(run, request, tmp_path):
    browser = find_browser()
    if browser is None:
        if os.environ.get("FEDFUSE_REQUIRE_BROWSER"):
            pytest.fail("no chromium found although FEDFUSE_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    page = write_report(request.getfixturevalue(run), tmp_path / "report.html")
    load = load_page(page, tmp_path / "screenshot.png", browser=browser)
    assert load.errors == []
    assert load.requests == [load.url] and load.outside_requests == []
    assert load.facts["headings"][:2] == [
        "Held-out scores per round, by modalities present at test time",
        "Modality contributions",
    ]
    assert load.facts["svgs"] >= 2 and load.facts["width"] <= 1200  # charts drawn, nothing wider than the window
    assert (tmp_path / "screenshot.png").stat().st_size > 20_000


def test_the_browser_check_catches_a_request_and_a_console_error(tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium installed")
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><title>x</title></head><body><img src="http://127.0.0.1:9/x.png">'
        '<script>console.error("boom")</script></body></html>'
    )
    load = load_page(bad, tmp_path / "bad.png", browser=browser)
    assert load.outside_requests == ["http://127.0.0.1:9/x.png"]
    assert any("boom" in e for e in load.errors)


def pooled_results(run: Path, tmp_path: Path) -> Path:
    """The failed-client run's results with pooled figures from per-class counts added to its final round, as
    results.json holds them when the sites release per-class counts (a confusion matrix, counts per subset)."""
    import shutil

    out = shutil.copytree(run, tmp_path / "pooled")
    results = json.loads((out / "results.json").read_text())
    k = 6
    confusion = [[8 if i == j else (2 if j == (i + 1) % k else 0) for j in range(k)] for i in range(k)]

    def subset(correct):
        return {
            "accuracy": sum(correct) / 60,
            "macro_f1": sum(correct) / 60,
            "num_examples": 60,
            "per_class": {"support": [10] * k, "predicted": [10] * k, "correct": correct},
        }

    pooled = {
        "accuracy": 0.8,
        "macro_f1": 0.8,
        "num_examples": 60,
        "labels": results["federation"]["labels"],
        "confusion": confusion,
        "by_modalities": {
            "image": subset([9, 9, 3, 3, 3, 3]),
            "signal": subset([3, 3, 9, 9, 3, 3]),
            "image+signal": subset([9, 9, 9, 9, 5, 5]),
        },
    }
    final = results["rounds"][-1]["evaluate"]
    final["pooled"] = pooled
    final.pop("modality_contributions")  # drawn by the report from the figures
    results["final"] = final
    results["warnings"] = [{"round": 2, "message": "held-out accuracy stayed at chance level"}]
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_pooled_per_class_counts_show_confusion_and_per_class_contributions(failed_client_run, tmp_path):
    page = render(pooled_results(failed_client_run, tmp_path))
    assert "Per class: Shapley values of the class’s recall" in page and "true ↓ / predicted →" in page
    assert "Recall per class, by modalities present at test time" in page
    assert "held-out accuracy stayed at chance level" in page and "(round 2)" in page
    assert "pooled held-out figures" in page or "Source: pooled" in page
    # alpha: image alone 0.9, signal alone 0.3, both 0.9, chance 1/6: image's value is the larger
    alpha = page[page.index("<td>alpha</td>") :].split("</tr>")[0]
    assert '<span class="top1">+0.' in alpha.split("</td>")[1]


def test_the_end_of_run_table_and_the_plot_show_the_contributions(failed_client_run, tmp_path, capsys):
    from common.insight.plots import plot_results
    from fedfuse.commands.report import print_contributions

    results = json.loads((failed_client_run / "results.json").read_text())
    print_contributions(results)
    printed = capsys.readouterr().out
    assert "Modality contributions" in printed and "image × signal" in printed
    assert {p.name for p in plot_results(results, tmp_path)} == {"accuracy.png", "epsilon.png", "contributions.png"}


def test_benchmark_tables_link_each_runs_report():
    import time

    from common.insight.report import REPORT_FILE as REPORT
    from simulations.bench._common import REPORT_FILE, hardware, header

    assert REPORT_FILE == REPORT
    text = header("t", time.perf_counter(), hardware(), {"eps8-s0": {}, "eps8-s1": {}})
    assert "[eps8-s0](runs/eps8-s0/report.html), [eps8-s1](runs/eps8-s1/report.html)" in text


def test_a_run_that_failed_before_any_round_still_renders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(
        json.dumps(
            {
                "run_id": "abc",
                "status": "failed",
                "error": "only 1 site(s) connected after waiting 60 s (round-timeout)",
                "config": RunConfig().to_flat(),
                "federation": {"modalities": ["image", "signal"], "labels": ["a", "b"]},
                "rounds": [],
                "final": None,
                "privacy": {"clients": {}},
            }
        )
    )
    page = render(run)
    assert "The run failed:</b> only 1 site(s) connected" in page and "No round was evaluated" in page
    assert "No client took part" in page and "No round completed" in page
