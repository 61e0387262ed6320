"""Held-out figures: pooled from the sites' per-class counts, the clients' mean beside them, tables, warnings."""

import itertools

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from client.handlers import handle_evaluate
from common import messages as M
from common.config import parse_run_config
from common.data.partition import client_partition
from common.model.evaluation import OWN_MODALITIES, evaluate, macro_f1, scores_from_counts, shown_subsets
from common.model.multimodal import ModelConfig, MultimodalModel
from server.metrics import summarize_evaluation
from server.replies import EvaluateReply, ReplyRejected, parse_evaluate_reply
from server.watch import learning_warnings
from tests.test_client import context, global_head, run_config, train_message

pytestmark = pytest.mark.usefixtures("task_identity")
LABELS = ["a", "b"]


def counted(client, y_true, y_pred, k=2):
    """An evaluate reply of ``client`` as the server parses it, from its labels and predictions."""
    y, p = torch.tensor(y_true), torch.tensor(y_pred)
    from common.model.evaluation import class_counts, confusion_matrix

    acc, f1 = float((y == p).float().mean()), macro_f1(y, p, k)
    return EvaluateReply(
        0,
        client,
        len(y),
        {"accuracy": acc, "macro-f1": f1, "loss": 1.0},
        {"x": {"accuracy": acc, "macro-f1": f1, "num-examples": len(y)}},
        confusion_matrix(y, p, k),
        {"x": class_counts(y, p, k)},
    )


def test_pooled_macro_f1_is_not_the_mean_of_the_clients_macro_f1():
    # Prepare: client a: 10 of class 0, half predicted 1; client b: 10 of class 1, all right
    a = counted("a", [0] * 10, [0] * 5 + [1] * 5)
    b = counted("b", [1] * 10, [1] * 10)
    # Execute
    out = summarize_evaluation([a, b], LABELS)
    # Assert: per class F1 of the pooled counts: 2*5/(10+5) and 2*10/(10+15); the clients' mean is (1/3 + 1) / 2
    assert out["pooled"]["macro_f1"] == pytest.approx((10 / 15 + 20 / 25) / 2)
    assert out["client_mean"]["macro_f1"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["pooled"]["accuracy"] == out["client_mean"]["accuracy"] == 0.75
    assert out["pooled"]["confusion"] == [[5, 5], [0, 10]] and out["pooled"]["labels"] == LABELS
    assert out["pooled"]["per_class"]["support"] == [10, 10] and out["pooled"]["per_class"]["recall"] == [0.5, 1.0]
    assert out["pooled"]["by_modalities"]["x"]["macro_f1"] == pytest.approx(out["pooled"]["macro_f1"])


def test_counts_give_the_macro_f1_of_the_predictions_for_random_cases():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        y, p = torch.randint(0, 5, (40,), generator=gen), torch.randint(0, 5, (40,), generator=gen)
        from common.model.evaluation import class_counts

        c = class_counts(y, p, 5)
        assert scores_from_counts(c["support"], c["predicted"], c["correct"])["macro_f1"] == pytest.approx(macro_f1(y, p, 5))


def test_sites_replies_pool_to_the_scores_of_all_their_predictions(tmp_path):
    # Prepare: two simulated clients with different modalities evaluate the same global head
    flat, head = run_config(tmp_path), global_head()
    messages = [handle_evaluate(train_message(head), context(flat, {"partition-id": i, "num-partitions": 6})) for i in (0, 1)]
    # Execute: the server parses the replies as it does in a run
    replies = [parse_evaluate_reply(m, 6) for m in messages]
    out = summarize_evaluation(replies, [str(i) for i in range(6)])
    # Assert: pooled = the scores of every prediction together, computed here from the same model and data
    config = parse_run_config(flat)
    truth, preds = [], []
    for i in (0, 1):
        part = client_partition(config, i)
        model = MultimodalModel(part.train.schema, ModelConfig(), seed=config.server.seed * 1000 + i + 1)
        model.load_partial({k: v for k, v in head.items() if k in model.state_dict()})
        report = evaluate(model, part.test)
        truth.append(part.test.labels)
        preds.append(report["predictions"])
    y, p = torch.cat(truth), torch.cat(preds)
    assert out["pooled"]["num_examples"] == len(y) == out["num_examples"]
    assert out["pooled"]["accuracy"] == pytest.approx(float((y == p).float().mean()))
    assert out["pooled"]["macro_f1"] == pytest.approx(macro_f1(y, p, 6))
    assert out["pooled"]["loss"] == pytest.approx(out["client_mean"]["loss"])


def test_inconsistent_or_malformed_counts_are_rejected():
    def reply(**metrics):
        base = {M.NUM_EXAMPLES: 4, M.ACCURACY: 0.5, M.MACRO_F1: 0.5, M.LOSS: 1.0}
        content = RecordDict(
            {
                M.METRICS: MetricRecord(base | metrics),
                M.CLIENT: __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord({M.CLIENT_ID: "c", M.MODALITIES: ["x"]}),
            }
        )
        return Message(content, dst_node_id=1, message_type="evaluate")

    assert parse_evaluate_reply(reply(confusion=[2, 0, 1, 1]), 2).confusion == [[2, 0], [1, 1]]
    with pytest.raises(ReplyRejected, match="counts 5 examples"):
        parse_evaluate_reply(reply(confusion=[2, 1, 1, 1]), 2)
    with pytest.raises(ReplyRejected, match="holds 3 counts, expected 4"):
        parse_evaluate_reply(reply(confusion=[2, 1, 1]), 2)
    with pytest.raises(ReplyRejected, match="inconsistent"):
        parse_evaluate_reply(
            reply(
                **{
                    "by.x.accuracy": 0.5,
                    "by.x.macro-f1": 0.5,
                    "by.x.num-examples": 4,
                    "by.x.support": [2, 2],
                    "by.x.predicted": [4, 0],
                    "by.x.correct": [2, 1],
                }
            ),
            2,
        )


def test_tables_show_singles_the_full_set_and_the_best_subsets_only():
    # Prepare: seven modalities, 127 subsets
    names = [f"m{i}" for i in range(7)]
    subsets = ["+".join(c) for k in range(1, 8) for c in itertools.combinations(names, k)]
    by = {s: {"accuracy": 0.5, "macro_f1": 0.1 + 0.001 * i, "num_examples": 10} for i, s in enumerate(subsets)}
    # Execute
    shown = shown_subsets(by)
    # Assert: 12 rows: the 7 singles, the full set, the 4 best others by macro-F1
    assert len(shown) == 12
    assert set(names) <= set(shown) and "+".join(names) in shown
    others = sorted(set(subsets) - set(names) - {"+".join(names)}, key=lambda s: -by[s]["macro_f1"])
    assert set(shown) - set(names) - {"+".join(names)} == set(others[:4])


def test_the_final_table_names_each_figure_for_what_it_is():
    from rich.console import Console

    from fedfuse.commands.simulate import final_table

    out = summarize_evaluation([counted("a", [0] * 10, [0] * 5 + [1] * 5), counted("b", [1] * 10, [1] * 10)], LABELS)
    console = Console(width=200, record=True)
    console.print(final_table(out, 3))
    text = console.export_text()
    assert OWN_MODALITIES in text and "all present" not in text
    assert "macro-F1 (client mean)" in text and "pooled: every client's test examples together" in text


def rounds_of(accuracies, n=200, support=(100, 100)):
    return [
        {
            "round": i + 1,
            "evaluate": {"pooled": {"accuracy": a, "macro_f1": a, "num_examples": n, "per_class": {"support": list(support)}}},
        }
        for i, a in enumerate(accuracies)
    ]


def test_a_run_stuck_at_chance_is_warned_about_once():
    warnings = learning_warnings(rounds_of([0.5, 0.49, 0.51, 0.5, 0.5]), total_rounds=5)
    assert [(w["round"], w["kind"]) for w in warnings] == [(3, "chance")]
    assert "fedfuse data inspect" in warnings[0]["message"]
    assert learning_warnings(rounds_of([0.5, 0.6, 0.7]), total_rounds=3) == []
    # chance is the majority class's share, not 1/K
    assert learning_warnings(rounds_of([0.6, 0.7, 0.75], support=(150, 50)), total_rounds=3)[0]["kind"] == "chance"


def test_a_collapse_is_warned_about_and_final_figures_below_the_best_are_flagged():
    # Prepare: 0.76 at round 3, then 0.56 (the run)
    warnings = learning_warnings(rounds_of([0.6, 0.7, 0.76, 0.56, 0.55]), total_rounds=5)
    assert [(w["round"], w["kind"]) for w in warnings] == [(4, "collapse"), (5, "final-below-best")]
    assert "0.760 at round 3" in warnings[0]["message"]
    # a drop within sampling noise of a small test set is not a collapse
    assert learning_warnings(rounds_of([0.6, 0.7, 0.76, 0.64], n=40), total_rounds=4) == []


def test_the_accuracy_plot_draws_the_shown_subsets_with_the_legend_outside(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from common.insight.plots import plot_accuracy

    # Prepare: two rounds of pooled figures for 127 subsets of seven modalities
    names = [f"m{i}" for i in range(7)]
    by = {
        "+".join(c): {"accuracy": 0.5, "macro_f1": 0.5, "num_examples": 10}
        for k in range(1, 8)
        for c in itertools.combinations(names, k)
    }
    rounds = [
        {"round": r, "evaluate": {"pooled": {"accuracy": 0.5, "macro_f1": 0.5, "num_examples": 10, "by_modalities": by}}}
        for r in (1, 2)
    ]
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    # Execute
    plot_accuracy({"rounds": rounds}, tmp_path / "accuracy.png")
    # Assert: the overall line and 12 subsets; the legend sits right of the axes and says where the rest is
    ax = figures[0].axes[0]
    assert len(ax.lines) == 13 and (tmp_path / "accuracy.png").exists()
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "+ 115 more in results.json"
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
