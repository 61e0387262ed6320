"""Simulated federations: deterministic partitions, modality assignment, missing rate, label skew, site folders."""

import pytest
import torch

from common.config import RunConfig, parse_run_config
from common.data import synthetic
from common.data.partition import client_partition, federation_space, idle_sites, num_clients, real_data_changes
from common.data.site_folders import write_site
from common.errors import ConfigError


def config(**flat):
    return parse_run_config(RunConfig().to_flat() | flat)


def test_partitions_are_deterministic_and_distinct():
    a, b = client_partition(config(), 1), client_partition(config(), 1)
    c = client_partition(config(), 2)
    assert torch.equal(a.train.inputs["image"], b.train.inputs["image"])
    assert not torch.equal(a.train.labels, c.train.labels)
    assert client_partition(config(seed=1), 1).train.labels.tolist() != a.train.labels.tolist()


def test_group_assignment_and_per_group_budgets():
    cfg = config(**{"data.groups": "image;signal+tabular", "dp.group-epsilon": "1,4", "data.num-clients": 4})
    parts = [client_partition(cfg, i) for i in range(4)]
    assert [p.modalities for p in parts] == [("image",), ("signal", "tabular")] * 2
    assert [p.budget for p in parts] == [1.0, 4.0, 1.0, 4.0]
    assert len(parts[0].train) == 960 and len(parts[0].test) == 240


def test_dropout_assignment_keeps_at_least_one_modality():
    cfg = config(**{"data.assignment": "dropout", "data.modality-drop-prob": 0.9, "data.num-clients": 20})
    held = [client_partition(cfg, i).modalities for i in range(20)]
    assert all(len(h) >= 1 for h in held)
    assert sum(len(h) for h in held) < 40  # most modalities dropped
    none = config(**{"data.assignment": "dropout", "data.modality-drop-prob": 0.0})
    assert client_partition(none, 0).modalities == ("image", "signal", "tabular")


def test_missing_rate_hides_modalities_per_sample():
    cfg = config(**{"data.assignment": "all", "data.missing-rate": 0.3})
    part = client_partition(cfg, 0)
    hidden = 1 - part.train.mask.float().mean().item()
    assert 0.2 < hidden < 0.35
    assert part.train.mask.any(dim=1).all()


def test_dirichlet_label_skew():
    skewed = client_partition(config(**{"data.dirichlet-alpha": 0.1}), 0).train.labels
    counts = torch.bincount(skewed, minlength=6).float() / len(skewed)
    assert counts.max() > 0.4  # one class dominates
    balanced = torch.bincount(client_partition(config(), 0).train.labels, minlength=6).float() / 960
    assert balanced.max() < 0.2


def test_unknown_group_modality_is_a_config_error():
    with pytest.raises(ConfigError, match="'data.groups'.*\\['audio'\\]"):
        client_partition(config(**{"data.groups": "audio"}), 0)


def test_a_folder_of_site_folders_is_a_federation(tmp_path):
    # Prepare: two sites, one without the tabular modality at all
    data = synthetic.generate(40, seed=3)
    write_site(tmp_path / "site-a", data, ["train"] * 30 + ["test"] * 10, name="site-a")
    write_site(tmp_path / "site-b", data.restrict(["image", "signal"]), ["train"] * 40, name="site-b")
    cfg = config(**{"data.dataset": str(tmp_path), "data.assignment": "all", "data.missing-rate": 0.0})
    # Execute / Assert
    assert num_clients(cfg) == 2
    a, b = client_partition(cfg, 0), client_partition(cfg, 1)
    assert (a.client_id, len(a.train), len(a.test)) == ("site-a", 30, 10)
    assert b.modalities == ("image", "signal") and b.test is None
    assert federation_space(cfg) == (("image", "signal", "tabular"), synthetic.LABELS)


def test_explicit_federation_space_for_deployments():
    cfg = config(**{"federation.modalities": "acc, gyro", "federation.labels": "walk,sit"})
    assert federation_space(cfg) == (("acc", "gyro"), ("walk", "sit"))
    with pytest.raises(ConfigError, match="go together"):
        federation_space(config(**{"federation.modalities": "acc"}))


def _real_federation(folder):
    """Three site folders as a user brings them: one with every modality, one without tabular, one test-only."""
    data = synthetic.generate(40, seed=3)
    write_site(folder / "site-a", data, ["train"] * 30 + ["test"] * 10, name="site-a")
    write_site(folder / "site-b", data.restrict(["image", "signal"]), ["train"] * 30 + ["val"] * 10, name="site-b")
    write_site(folder / "site-c", data, ["testing"] * 40, name="site-c")
    return data


def test_site_folders_are_used_as_they_are_by_default(tmp_path):
    # Prepare: the README's command, nothing but the dataset set (the default scenario's keys at their defaults)
    data = _real_federation(tmp_path)
    cfg = config(**{"data.dataset": str(tmp_path)})
    # Execute
    a, b = client_partition(cfg, 0), client_partition(cfg, 1)
    # Assert: every site keeps the modalities it has, no sample loses one, and the run log has nothing to say
    assert (a.modalities, b.modalities) == (("image", "signal", "tabular"), ("image", "signal"))
    assert torch.equal(a.train.mask, data.mask[:30]) and torch.equal(a.test.mask, data.mask[30:])
    assert torch.equal(b.train.mask, data.restrict(["image", "signal"]).mask[:30])
    assert real_data_changes(cfg) == []
    # the synthetic dataset keeps its simulated federation: groups and a 10 % missing rate
    synth = config()
    assert synth.data.effective_assignment == "groups" and synth.data.effective_missing_rate == 0.1
    assert client_partition(synth, 4).modalities == ("image",)


def test_knobs_set_explicitly_alter_real_data_and_say_so(tmp_path):
    # Prepare
    data = _real_federation(tmp_path)
    cfg = config(
        **{
            "data.dataset": str(tmp_path),
            "data.missing-rate": 0.3,
            "data.assignment": "groups",
            "data.groups": "image+signal;signal",
        }
    )
    # Execute
    a, b = client_partition(cfg, 0), client_partition(cfg, 1)
    changes = real_data_changes(cfg)
    # Assert: the knobs apply, and each change is named with its key
    assert a.modalities == ("image", "signal") and b.modalities == ("signal",)
    assert int(a.train.mask.sum()) < int(data.mask[:30, :2].sum())
    assert len(changes) == 2 and 'data.assignment = "groups"' in changes[0] and "data.missing-rate = 0.3" in changes[1]
    # "auto" can also be written out, and a word that is not a number says what it expects
    assert config(**{"data.missing-rate": "auto"}).data.missing_rate == "auto"
    with pytest.raises(ConfigError, match='data.missing-rate.*number or "auto"'):
        config(**{"data.missing-rate": "some"})


def test_sites_that_do_not_train_are_named_with_the_reason(tmp_path):
    # Prepare
    _real_federation(tmp_path)
    cfg = config(**{"data.dataset": str(tmp_path)})
    # Execute
    idle = idle_sites(cfg)
    # Assert: two clients; the test-only site is reported, with a hint about its split name
    assert num_clients(cfg) == 2
    assert list(idle) == ["site-c"]
    assert "no 'train' split" in idle["site-c"] and "'testing' is not used (did you mean 'test'?)" in idle["site-c"]
