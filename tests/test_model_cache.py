"""client/model_cache.py: a site's last trained model, reused in its next round only while it is what its file holds."""

import pytest
import torch

from client import handlers
from client.model_cache import ModelCache
from client.state import MODEL_FILE
from common.fileio import atomic_save_tensors, load_tensors
from common.model.multimodal import ModelConfig, MultimodalModel
from common.privacy.accounting import PrivacyHistory
from common.privacy.randomness import RoundRandomness
from common.privacy.training import train_round
from tests.round_helpers import settings
from tests.test_client import context, global_head, run_config, train_message

CONFIG = ModelConfig(embed_dim=16, hidden_dim=16)
DP = dict(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2, local_epochs=1, batch_size=50, momentum=0.9)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["flat", "hooks", "functorch"])
def test_a_model_kept_after_a_dp_round_trains_the_next_round_exactly_as_one_read_back_from_disk(synth_train, tmp_path, mode):
    # Prepare: round 1 of DP-SGD (Opacus wraps the model, then lets go of it), the result saved and kept
    data = synth_train.subset(range(200))
    kept, history = MultimodalModel(data.schema, CONFIG, seed=3), PrivacyHistory()
    train_round(kept, data, history, **settings(**DP, grad_sample_mode=mode), _randomness=RoundRandomness(1))
    atomic_save_tensors(tmp_path / MODEL_FILE, kept.state_dict())
    cache = ModelCache()
    cache.keep(tmp_path, tmp_path / MODEL_FILE, "built-as", kept)
    reused = cache.take(tmp_path, tmp_path / MODEL_FILE, "built-as")
    restored = MultimodalModel(data.schema, CONFIG, seed=3)
    restored.load_state_dict(load_tensors(tmp_path / MODEL_FILE))
    # Execute: round 2 on each, with the same (test-only) fixed randomness and equal histories
    assert reused is kept and len(cache) == 0  # taken out while it trains
    again = PrivacyHistory.from_json(history.to_json())
    train_round(reused, data, history, **settings(**DP, grad_sample_mode=mode), _randomness=RoundRandomness(2))
    train_round(restored, data, again, **settings(**DP, grad_sample_mode=mode), _randomness=RoundRandomness(2))
    # Assert: bit for bit the same parameters: nothing of round 1's Opacus wrapping or gradients is left behind
    after, expected = state(reused), state(restored)
    assert after.keys() == expected.keys() and all(torch.equal(after[k], expected[k]) for k in expected)
    assert history.entries == again.entries


def test_a_kept_model_is_not_used_once_its_file_was_replaced_or_it_was_built_otherwise(synth_train, tmp_path):
    model = MultimodalModel(synth_train.schema, CONFIG, seed=3)
    cache, file = ModelCache(), tmp_path / MODEL_FILE
    atomic_save_tensors(file, model.state_dict())
    cache.keep(tmp_path, file, ("client-00", 3), model)
    assert cache.take(tmp_path, file, ("client-01", 3)) is None  # another client, or another seed or model config
    cache.keep(tmp_path, file, ("client-00", 3), model)
    atomic_save_tensors(file, model.state_dict())  # the same weights, written anew (a restore, another process)
    assert cache.take(tmp_path, file, ("client-00", 3)) is None
    cache.keep(tmp_path, file, ("client-00", 3), model)
    file.unlink()
    assert cache.take(tmp_path, file, ("client-00", 3)) is None and len(cache) == 0


def test_the_cache_keeps_at_most_its_models_and_bytes_least_recently_trained_out_first(synth_train, tmp_path):
    models = [MultimodalModel(synth_train.schema, CONFIG, seed=s) for s in range(3)]
    size = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    cache = ModelCache(max_bytes=2 * size)
    for i, model in enumerate(models):
        (tmp_path / str(i)).mkdir()
        atomic_save_tensors(tmp_path / str(i) / MODEL_FILE, model.state_dict())
        cache.keep(tmp_path / str(i), tmp_path / str(i) / MODEL_FILE, i, model)
    assert len(cache) == 2 and cache.take(tmp_path / "0", tmp_path / "0" / MODEL_FILE, 0) is None
    assert cache.take(tmp_path / "2", tmp_path / "2" / MODEL_FILE, 2) is models[2]
    too_small = ModelCache(max_bytes=size - 1)
    too_small.keep(tmp_path / "1", tmp_path / "1" / MODEL_FILE, 1, models[1])
    assert len(too_small) == 0  # a model bigger than the whole cache is not kept
    one = ModelCache(max_models=1)
    for i in (0, 1):
        one.keep(tmp_path / str(i), tmp_path / str(i) / MODEL_FILE, i, models[i])
    assert len(one) == 1 and one.take(tmp_path / "1", tmp_path / "1" / MODEL_FILE, 1) is models[1]


@pytest.mark.usefixtures("task_identity")
def test_a_sites_rounds_reuse_its_trained_model_and_a_failed_round_leaves_none(tmp_path, monkeypatch):
    # Prepare: count the models the handlers build; two sites trained by one process
    built = []
    real = handlers.MultimodalModel
    monkeypatch.setattr(handlers, "MultimodalModel", lambda *a, **k: built.append(1) or real(*a, **k))
    handlers.MODELS.clear()
    flat, head = run_config(tmp_path), global_head()
    site_0, site_1 = context(flat), context(flat, {"partition-id": 1, "num-partitions": 6})

    def train(ctx, server_round):
        return handlers.handle_train(train_message(head, server_round=server_round, planned=5), ctx)

    # Execute / Assert: round 1 builds each site's model, round 2 reuses it (an evaluation in between builds its own)
    train(site_0, 1), train(site_1, 1)
    assert len(built) == 2 and len(handlers.MODELS) == 2
    handlers.handle_evaluate(train_message(head, server_round=1), site_0)
    assert len(built) == 3
    train(site_0, 2), train(site_1, 2)
    assert len(built) == 3

    # a round that fails after taking the model keeps nothing: the next one reads the model file again
    def fails(*args, **kwargs):
        raise RuntimeError("the round failed before using any data")

    with monkeypatch.context() as patched:
        patched.setattr(handlers, "train_round", fails)
        with pytest.raises(RuntimeError):
            train(site_0, 3)
    assert len(built) == 3 and len(handlers.MODELS) == 1  # site 1's model only
    reply = train(site_0, 3)
    assert reply.content[handlers.M.CLIENT][handlers.M.STATUS] == handlers.M.STATUS_OK and len(built) == 4
