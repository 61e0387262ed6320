"""Bring your own encoder: factories named in the run config, a deployed site's allowlist, and the checks an
encoder passes before it touches data (real Opacus, synthetic inputs from the schema)."""

from __future__ import annotations

import sys

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from common import messages as M
from common.config import RunConfig, parse_run_config
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import ConfigError, EncoderError
from common.model.multimodal import ModelConfig, MultimodalModel
from common.model.validation import check_encoder, check_run_encoders, site_refusal, synthetic_batch

SIGNAL = ModalitySpec("acc", "signal", (3, 40))
TEXT = ModalitySpec("words", "text", (12,), "int64", vocab_size=40)
IMAGE = ModalitySpec("img", "image", (1, 12, 12))
F = "encoder_factories"  # tests/encoder_factories.py


def refusal(spec, choice, mode="flat") -> str:
    check_encoder.cache_clear()
    with pytest.raises(EncoderError) as info:
        check_encoder(spec, 8, choice, mode)
    return str(info.value)


@pytest.mark.parametrize("mode", ["flat", "hooks", "functorch"])
def test_a_valid_custom_encoder_passes_every_check_in_every_mode(mode):
    check_encoder(SIGNAL, 8, f"{F}:small_linear", mode)


def test_the_groupnorm_factory_passes_under_opacus_hooks():
    check_encoder(SIGNAL, 8, f"{F}:small_signal", "hooks")


@pytest.mark.parametrize(("choice", "modes"), [("lstm", ["hooks", "functorch"]), ("transformer", ["flat", "hooks", "functorch"])])
def test_built_in_lstm_and_transformer_have_exact_per_sample_gradients(choice, modes):
    spec = SIGNAL if choice == "lstm" else TEXT
    for mode in modes:
        check_encoder(spec, 8, choice, mode)  # exact against a loop over single samples, or EncoderError


def test_the_lstm_under_flat_mode_is_refused_with_the_mode_to_use():
    text = refusal(SIGNAL, "lstm", "flat")
    assert 'train.grad-sample-mode = "flat" cannot compute' in text and "DPLSTM" in text and "'hooks'" in text


def test_batch_norm_is_refused_with_the_reason_and_groupnorm():
    text = refusal(SIGNAL, f"{F}:batch_norm")
    assert "BatchNorm1d" in text and "depends on the other samples" in text and "GroupNorm" in text


def test_a_layer_opacus_cannot_handle_is_refused_with_opacus_reason():
    text = refusal(SIGNAL, f"{F}:plain_lstm", "hooks")
    assert "ModuleValidator refuses it" in text and "DPLSTM" in text


def test_dropout_is_refused_as_randomness_that_is_not_per_record():
    assert "random in training mode" in refusal(SIGNAL, f"{F}:dropout")


def test_batch_mixing_is_refused():
    assert "it mixes samples" in refusal(SIGNAL, f"{F}:batch_mixing")


def test_wrong_output_size_is_refused():
    assert "(4, 8) (batch, model.embed-dim), got (4, 9)" in refusal(SIGNAL, f"{F}:wrong_size")


def test_a_non_finite_embedding_of_an_absent_input_is_refused():
    assert "zero-filled input" in refusal(SIGNAL, f"{F}:not_finite_when_absent")


@pytest.mark.parametrize("mode", ["flat", "hooks"])
def test_inexact_per_sample_gradients_are_refused(mode):
    # the weight is used a second time outside its layer: neither engine sees that use
    text = refusal(SIGNAL, f"{F}:hidden_weight_use", mode)
    assert "differs from a loop over single samples" in text or "gets none" in text


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (f"{F}:not_a_module", "not a torch.nn.Module"),
        (f"{F}:raises", "the factory raised RuntimeError: this factory wants a kind 'image' modality"),
        (f"{F}:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        (f"{F}:missing", "has no callable 'missing'"),
        ("no_such_package.encoders:net", "cannot import module 'no_such_package.encoders'"),
        ("conv1d-ish", "not a built-in encoder"),
        ("a.b:c:d", "a factory is named"),
        ("transformer", "encodes kind 'text', but modality 'acc' is of kind 'signal'"),
    ],
)
def test_factories_that_cannot_be_used_are_refused(choice, expected):
    assert expected in refusal(SIGNAL, choice)


def test_checks_use_synthetic_inputs_with_a_zero_filled_sample_and_leave_the_rng_alone():
    x = synthetic_batch(TEXT)
    assert x.dtype == torch.int64 and (x[-1] == 0).all() and (x[0, 6:] == 0).all() and (x[:3, 0] > 0).all()
    before = torch.random.get_rng_state()
    check_encoder.cache_clear()
    check_encoder(TEXT, 8, "transformer", "flat")
    assert torch.equal(before, torch.random.get_rng_state())


def test_run_config_names_encoders_per_modality_in_both_spellings():
    config = parse_run_config({"model.encoder.acc": "lstm", "model.encoder": "words = transformer"})
    assert config.model.encoders == {"acc": "lstm", "words": "transformer"}
    assert config.to_flat()["model.encoder"] == "acc=lstm,words=transformer"
    assert parse_run_config(config.to_flat()) == config
    with pytest.raises(ConfigError, match="is also named in 'model.encoder'"):
        parse_run_config({"model.encoder.acc": "lstm", "model.encoder": "acc=conv1d"})
    with pytest.raises(ConfigError, match="modality=value"):
        parse_run_config({"model.encoder": "lstm"})
    with pytest.raises(EncoderError, match="not a built-in encoder"):
        parse_run_config({"model.encoder.acc": "lstn"})


def test_model_encoder_pairs_may_be_separated_like_model_transforms():
    # model.transforms separates modalities with ';': the same spelling here named 'lstm;gyro=lstm' as acc's encoder
    semicolons = parse_run_config({"model.encoder": "acc=lstm; gyro=lstm", "model.transforms": "acc=magnitude;gyro=magnitude"})
    assert (
        semicolons.model
        == parse_run_config({"model.encoder": "acc=lstm,gyro=lstm", "model.transforms": "acc=magnitude;gyro=magnitude"}).model
    )
    assert semicolons.model.encoders == {"acc": "lstm", "gyro": "lstm"}


def test_the_model_builds_the_named_encoders():
    schema = DatasetSchema((SIGNAL, TEXT), ("a", "b"))
    config = parse_run_config({"model.encoder": f"acc={F}:small_signal,words=transformer"}).model
    model = MultimodalModel(schema, config, seed=0)
    assert type(model.encoders["acc"]).__name__ == "SmallSignalNet"
    assert type(model.encoders["words"]).__name__ == "TransformerTextEncoder"
    x = {"acc": synthetic_batch(SIGNAL), "words": synthetic_batch(TEXT)}
    assert model(x, torch.ones(4, 2, dtype=torch.bool)).shape == (4, 2)


def test_a_simulation_names_only_modalities_it_has():
    with pytest.raises(EncoderError, match="the federation has no modality 'gyro'"):
        check_run_encoders((SIGNAL,), {"gyro": "lstm"}, {}, 8, "hooks")
    with pytest.raises(EncoderError, match="BatchNorm"):
        check_run_encoders((SIGNAL,), {"acc": f"{F}:batch_norm"}, {}, 8, "hooks")


def test_a_site_allows_only_the_factories_its_node_config_lists():
    encoders = {"acc": f"{F}:small_signal", "words": "transformer"}
    assert site_refusal(encoders, {"allowed-encoders": f"{F}:small_signal, other.mod:net"}) is None
    assert site_refusal({"words": "transformer"}, {}) is None  # built-ins are part of the reviewed fedfuse
    text = site_refusal(encoders, {"allowed-encoders": "other.mod:net"})
    assert text == (
        f"this site does not allow the encoder factory '{F}:small_signal': a site imports only the "
        "factories its node config lists under 'allowed-encoders' (other.mod:net)"
    )


@pytest.mark.usefixtures("task_identity")
def test_a_deployed_site_refuses_a_factory_before_loading_data_or_importing_it(tmp_path):
    from client.handlers import handle_evaluate, handle_train

    sys.modules.pop("never_imported_factories", None)
    flat = RunConfig().to_flat() | {"model.encoder": "acc=never_imported_factories:net"}
    node = {
        "data-dir": str(tmp_path / "no-such-site"),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 8.0,
        "num-train-examples": 100,
        "client-id": "berlin",
    }
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=flat)
    for handle in (handle_train, handle_evaluate):
        message = Message(RecordDict({M.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type="train")
        reply = handle(message, context)
        ident = reply.content[M.CLIENT]
        assert ident[M.STATUS] == M.STATUS_POLICY_REFUSED and ident[M.CLIENT_ID] == "berlin"
        assert "does not allow the encoder factory 'never_imported_factories:net'" in ident[M.REASON]
    assert "never_imported_factories" not in sys.modules and not (tmp_path / "state").exists()


@pytest.mark.usefixtures("task_identity")
def test_a_site_trains_an_allowed_custom_encoder_and_refuses_a_batch_norm_one(tmp_path):
    from test_client import deployed_site, global_head, train_message

    from client.handlers import handle_train

    _, node = deployed_site(tmp_path, **{"allowed-encoders": f"{F}:small_signal,{F}:batch_norm"})
    flat = RunConfig().to_flat() | {
        "model.encoder": f"signal={F}:small_signal",
        "train.grad-sample-mode": "hooks",
        "train.batch-size": 25,
        "dp.epsilon": 4.0,
    }
    reply = handle_train(
        train_message(global_head()), Context(run_id=5, node_id=11, node_config=node, state=RecordDict(), run_config=flat)
    )
    assert reply.content[M.CLIENT][M.STATUS] == M.STATUS_OK and 0 < reply.content[M.METRICS][M.EPSILON] <= 4.0
    from client.state import ClientState

    assert "encoders.signal.norm.weight" in ClientState(tmp_path / "state").load_model()  # the GroupNorm of the factory

    node["state-dir"] = str(tmp_path / "state-2")
    flat["model.encoder"] = f"signal={F}:batch_norm"
    reply = handle_train(
        train_message(global_head()), Context(run_id=5, node_id=11, node_config=node, state=RecordDict(), run_config=flat)
    )
    ident = reply.content[M.CLIENT]
    assert ident[M.STATUS] == M.STATUS_POLICY_REFUSED and "use torch.nn.GroupNorm" in ident[M.REASON]
    assert reply.content[M.METRICS][M.NUM_EXAMPLES] == 0 and M.EPSILON not in reply.content[M.METRICS]


def test_an_lstm_encoder_saves_each_parameter_once_and_loads_back(tmp_path):
    from common.fileio import atomic_save_tensors, load_tensors

    schema = DatasetSchema((SIGNAL,), ("a", "b"))
    config = ModelConfig(encoder="acc=lstm")
    model, other = MultimodalModel(schema, config, seed=0), MultimodalModel(schema, config, seed=1)
    state = model.state_dict()
    assert len(state) == len(list(model.parameters()))  # nn.LSTM's names only, not also the cells' aliases
    atomic_save_tensors(tmp_path / "model.safetensors", state)  # safetensors refuses tensors that share memory
    other.load_state_dict(load_tensors(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
