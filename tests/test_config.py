"""Run config: one validated object; pyproject defaults, scenarios and overrides agree with it."""

import math
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, flatten, known_keys, parse_run_config
from common.errors import ConfigError
from simulations.scenario import build_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_config_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flatten(table) == RunConfig().to_flat()


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ConfigError, match="unknown run config key 'train.local-epoch'; did you mean 'train.local-epochs'"):
        parse_run_config({"train.local-epoch": 2})
    with pytest.raises(ConfigError, match="unknown run config key 'train.local_epochs'"):
        parse_run_config({"train.local_epochs": 2})  # keys are kebab-case


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("num-server-rounds", "ten", "expected an integer"),
        ("num-server-rounds", 0, "must be >= 1"),
        ("strategy", "fedsgd", "must be one of"),
        ("fraction-train", 0.0, "must lie in \\(0, 1\\]"),
        ("dp.epsilon", 0.0, "must be > 0"),
        ("dp.delta", 1.0, "must lie in \\(0, 1\\)"),
        ("dp.accountant", "gdp", "'prv' or 'rdp'"),
        ("release.eval-metrics", "yes", "expected true or false"),
        ("data.assignment", "random", "must be one of"),
        ("data.missing-rate", 1.0, "must lie in \\[0, 1\\)"),
        ("dp.group-epsilon", "8,x", "comma-separated numbers"),
    ],
)
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError, match=f"'{key}'.*{fragment}"):
        parse_run_config({key: value})


def test_types_are_coerced_where_safe():
    config = parse_run_config({"dp.epsilon": 4, "train.batch-size": 32.0, "dp.delta": 1e-6})
    assert config.dp.epsilon == 4.0 and isinstance(config.dp.epsilon, float)
    assert config.train.batch_size == 32 and isinstance(config.train.batch_size, int)
    assert math.isinf(parse_run_config({"dp.epsilon": "inf"}).dp.epsilon)


def test_every_shipped_scenario_is_valid():
    scenarios = sorted((ROOT / "simulations" / "scenarios").glob("*.toml"))
    assert len(scenarios) >= 3
    for path in scenarios:
        flat = build_config(path, [])
        assert set(flat) == set(known_keys())


def test_overrides_are_toml_values_or_bare_strings():
    assert parse_override("dp.epsilon=4") == ("dp.epsilon", 4)
    assert parse_override("model.fusion=concat") == ("model.fusion", "concat")
    assert parse_override("dp.epsilon=inf")[1] == math.inf
    assert parse_override('data.groups="a;b"') == ("data.groups", "a;b")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("dp.epsilon")
    with pytest.raises(ConfigError, match="'model.fusion'"):
        build_config(None, ["model.fusion=early"])


def test_simulate_reports_bad_data_before_starting_anything(tmp_path, capsys):
    from common.data import synthetic
    from common.data.site_folders import write_site
    from fedfuse.cli import main

    sites = tmp_path / "sites"
    write_site(sites / "a", synthetic.generate(20, seed=1), ["train"] * 20, name="a")
    (sites / "a" / "signal.npy").write_bytes(b"not an array")
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--set", f"data.dataset={sites}", "--set", "data.assignment=all"]) == 2
    err = capsys.readouterr().err
    assert "signal.npy" in err and not out.exists()
    assert main(["simulate", "--out", str(out), "--set", "data.dataset=/nonexistent/folder"]) == 2
    assert "neither 'synthetic' nor an existing folder" in capsys.readouterr().err


def test_a_large_synthetic_federation_is_checked_before_anything_starts_without_building_every_client(tmp_path, capsys):
    import time

    from fedfuse.cli import main

    # 1,000 synthetic clients with an encoder named for a modality none of them holds: refused at once (building
    # every client's data first took 0.1-0.6 s a client, minutes before the error)
    out = tmp_path / "run"
    started = time.perf_counter()
    args = ["simulate", "--out", str(out), "--set", "data.num-clients=1000", "--set", 'model.encoder.audio="x:y"']
    assert main(args) == 2
    assert time.perf_counter() - started < 30
    assert "no modality 'audio'" in capsys.readouterr().err and not out.exists()
