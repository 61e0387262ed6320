"""Attention fusion's weight per modality and class: computed by the client on held-out data, checked and
pooled by the server."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.handlers import handle_evaluate
from common import messages as M
from common.config import RunConfig
from common.data.samples import hide_modalities
from common.insight.attention import attention_metrics, attention_sums, pool
from common.model.multimodal import ModelConfig, MultimodalModel, global_head_template
from server.replies import ReplyRejected, parse_evaluate_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def test_sums_are_the_per_sample_weights_of_samples_with_two_or_more_modalities(synth_test):
    model = MultimodalModel(synth_test.schema, ModelConfig(embed_dim=8, hidden_dim=8), seed=1)
    mask = hide_modalities(synth_test.mask, 0.4, torch.Generator().manual_seed(0))
    data = type(synth_test)(synth_test.schema, synth_test.inputs, mask, synth_test.labels)
    sums, counts = attention_sums(model, data, batch_size=64)
    # The same, one sample at a time
    expected_sums, expected_counts = torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.int64)
    for i in range(len(data)):
        if mask[i].sum() < 2:
            continue
        with torch.no_grad():
            w = model.head.attention(
                model.embed({n: x[i : i + 1] for n, x in data.inputs.items()}, mask[i : i + 1]), mask[i : i + 1]
            )[0]
        expected_sums[:, data.labels[i]] += w.double() * mask[i]
        expected_counts[:, data.labels[i]] += mask[i].long()
    assert torch.equal(counts, expected_counts) and counts.sum() > 0
    assert torch.allclose(sums, expected_sums, atol=1e-6)
    # Over the present modalities the weights sum to one, so each class's sums add up to its samples.
    two_plus = mask.sum(dim=1) >= 2
    per_class = torch.bincount(data.labels[two_plus], minlength=6).double()
    assert torch.allclose(sums.sum(dim=0), per_class, atol=1e-5)


def test_only_attention_fusion_releases_attention(synth_test):
    for fusion in ("concat", "late"):
        model = MultimodalModel(synth_test.schema, ModelConfig(fusion, embed_dim=8, hidden_dim=8), seed=1)
        assert attention_metrics(model, synth_test) == {}
    model = MultimodalModel(synth_test.schema, ModelConfig(embed_dim=8, hidden_dim=8), seed=1)
    metrics = attention_metrics(model, synth_test)
    assert len(metrics) == 3 * 6 * 2 and metrics["attention.signal.4.count"] == int((synth_test.labels == 4).sum())


def test_a_client_evaluation_carries_attention_and_the_server_pools_it(tmp_path):
    flat = RunConfig().to_flat() | {"out-dir": str(tmp_path), "data.samples-per-client": 300}
    head = global_head_template(["image", "signal", "tabular"], 6, ModelConfig())
    request = Message(
        RecordDict({**M.pack_arrays(head), M.CONFIG: ConfigRecord({M.SERVER_ROUND: 1, M.RUN_ID: "r"})}),
        dst_node_id=11,
        message_type="evaluate",
    )
    ctx = Context(run_id=5, node_id=11, node_config={"partition-id": 1, "num-partitions": 6}, state=RecordDict(), run_config=flat)
    reply = handle_evaluate(request, ctx)
    keys = [k for k in reply.content[M.METRICS] if k.startswith(M.ATTENTION_PREFIX)]
    assert keys and {k.split(".")[1] for k in keys} == {"image", "signal"}  # client 1 holds image + signal
    parsed = parse_evaluate_reply(Message(reply.content, reply_to=request))
    assert set(parsed.attention) == set(keys)
    hidden = handle_evaluate(
        request,
        Context(
            run_id=5,
            node_id=11,
            node_config=ctx.node_config,
            state=RecordDict(),
            run_config=flat | {"release.eval-metrics": False},
        ),
    )
    assert not any(k.startswith(M.ATTENTION_PREFIX) for k in hidden.content[M.METRICS])


def test_the_server_adds_sums_and_counts_over_clients():
    a = {"attention.image.0.weight-sum": 6.0, "attention.image.0.count": 10}
    b = {
        "attention.image.0.weight-sum": 6.0,
        "attention.image.0.count": 30,
        "attention.signal.1.weight-sum": 3.0,
        "attention.signal.1.count": 4,
    }
    assert pool([a, b]) == {"image": {"0": {"mean": 0.3, "samples": 40}}, "signal": {"1": {"mean": 0.75, "samples": 4}}}
    assert pool([]) is None


@pytest.mark.parametrize("key", ["attention.image.x.count", "attention.image.0.mean", "attention..0.count"])
def test_a_malformed_attention_metric_is_rejected(key):
    request = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=3, message_type="evaluate")
    content = RecordDict(
        {
            M.METRICS: MetricRecord({M.NUM_EXAMPLES: 5, M.ACCURACY: 0.5, M.MACRO_F1: 0.5, M.LOSS: 1.0, key: 1.0}),
            M.CLIENT: ConfigRecord({M.CLIENT_ID: "c", M.MODALITIES: ["image"]}),
        }
    )
    with pytest.raises(ReplyRejected, match="attention"):
        parse_evaluate_reply(Message(content, reply_to=request))
