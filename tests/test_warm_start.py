"""Transfer learning: `fedfuse pretrain` on a public site folder writes encoder weights + a description;
model.init warm-starts fresh encoders from them, and refuses a file that does not fit (real files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from client.handlers import _model
from client.site import resolve_site
from client.state import ClientState
from common.config import RunConfig, parse_run_config
from common.data import synthetic
from common.data.site_folders import write_site
from common.errors import EncoderError
from common.model.encoders import build_encoder
from common.model.warm_start import read_encoder_weights, save_encoder_weights, warm_start
from fedfuse.cli import main

IMAGE = synthetic.schema().modalities[0]


@pytest.fixture(scope="module")
def public_site(tmp_path_factory):
    """A small public site folder: the synthetic dataset's images only (120 train, 30 test)."""
    data = synthetic.generate(150, seed=7)
    images = type(data)(
        type(data.schema)((IMAGE,), data.schema.labels), {"image": data.inputs["image"]}, data.mask[:, :1], data.labels
    )
    return write_site(tmp_path_factory.mktemp("public") / "images", images, ["train"] * 120 + ["test"] * 30, name="public-images")


@pytest.fixture(scope="module")
def pretrained(public_site, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "image-cnn.safetensors"
    status = main(
        [
            "pretrain",
            "--data",
            str(public_site),
            "--modality",
            "image",
            "--out",
            str(out),
            "--embed-dim",
            "16",
            "--epochs",
            "4",
            "--lr",
            "0.01",
        ]
    )
    assert status == 0
    return out


def test_pretrain_writes_weights_and_a_description_that_learned_something(pretrained):
    weights = load_file(str(pretrained))
    assert set(weights) == set(build_encoder(IMAGE, 16).state_dict())
    described = json.loads((pretrained.parent / (pretrained.name + ".json")).read_text())
    assert described["modality"] == "image" and described["embed_dim"] == 16 and described["private"] is False
    assert described["trained_on"] == {"site": "public-images", "train_samples": 120, "labels": list(synthetic.schema().labels)}
    assert (
        described["test_samples"] == 30 and described["test_accuracy"] > 1 / 6 + 0.1
    )  # above chance (the image alone carries part of the label)


def test_pretrain_refuses_to_overwrite_and_unknown_modalities(public_site, pretrained, capsys):
    assert main(["pretrain", "--data", str(public_site), "--modality", "image", "--out", str(pretrained)]) == 2
    assert "exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    out = pretrained.parent / "other.safetensors"
    assert main(["pretrain", "--data", str(public_site), "--modality", "audio", "--out", str(out)]) == 2
    assert "has no modality 'audio' (it has image)" in capsys.readouterr().err and not out.exists()


@pytest.mark.usefixtures("task_identity")
def test_a_fresh_client_starts_from_the_file_and_a_restored_one_keeps_its_state(pretrained, tmp_path):
    flat = RunConfig().to_flat() | {
        "out-dir": str(tmp_path),
        "data.samples-per-client": 200,
        "model.embed-dim": 16,
        "model.init": f"image={pretrained}",
    }
    config = parse_run_config(flat)
    site = resolve_site({"partition-id": 0, "num-partitions": 6}, config, 1)
    (tmp_path / "state").mkdir()
    state = ClientState(tmp_path / "state")
    model = _model(site, config, state)
    expected = load_file(str(pretrained))
    assert all(torch.equal(v, expected[k]) for k, v in model.encoders["image"].state_dict().items())
    # once the client has its own state, the file is not applied again
    changed = {k: v + 1.0 if k.startswith("encoders.image.") else v for k, v in model.state_dict().items()}
    state.save_model(changed)
    again = _model(site, config, state)
    assert torch.equal(again.encoders["image"].proj.bias, expected["proj.bias"] + 1.0)


def test_pretrain_takes_the_runs_norm_and_width_and_a_file_without_them_is_refused(public_site, pretrained, tmp_path):
    # Execute: pretrain the image encoder with model.norm = "group", model.width = 8
    out = tmp_path / "group.safetensors"
    argv = ["pretrain", "--data", str(public_site), "--modality", "image", "--out", str(out), "--embed-dim", "16"]
    assert main([*argv, "--epochs", "1", "--norm", "group", "--width", "8"]) == 0
    # Assert: it fits that encoder and says so; the plain file does not fit it, and the reason names model.norm
    grouped = build_encoder(IMAGE, 16, norm="group", width=8)
    assert set(read_encoder_weights(out, grouped, "image")) == set(grouped.state_dict())
    described = json.loads((tmp_path / "group.safetensors.json").read_text())
    assert (described["norm"], described["width"]) == ("group", 8)
    with pytest.raises(EncoderError, match=r"model.norm / model.width"):
        read_encoder_weights(pretrained, grouped, "image")


def test_files_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    encoder = build_encoder(IMAGE, 16)
    good = save_encoder_weights(tmp_path / "good.safetensors", encoder, {"modality": "image"})
    assert set(read_encoder_weights(good, build_encoder(IMAGE, 16), "image")) == set(encoder.state_dict())

    def refused(tensors, expected, name="bad.safetensors"):
        path = tmp_path / name
        save_file(tensors, str(path))
        with pytest.raises(EncoderError, match=expected):
            warm_start({"image": build_encoder(IMAGE, 16)}, {"image": str(path)})

    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    refused(
        state | {"proj.weight": torch.zeros(8, state["proj.weight"].shape[1])},
        r"'proj.weight' has shape \(8, \d+\), the encoder of modality 'image' \(16, \d+\)",
    )
    refused(
        {k: v for k, v in state.items() if k != "proj.bias"},
        r"keys do not match the encoder of modality 'image' \(missing \['proj.bias'\]\)",
    )
    refused(state | {"extra": torch.zeros(1)}, r"\(unexpected \['extra'\]\)")
    refused(state | {"proj.bias": torch.full((16,), float("nan"))}, "'proj.bias' holds NaN or infinite values")
    (tmp_path / "text.safetensors").write_text("not weights")
    with pytest.raises(EncoderError, match="not a readable safetensors file"):
        read_encoder_weights(tmp_path / "text.safetensors", encoder, "image")
    with pytest.raises(EncoderError, match="no such file"):
        read_encoder_weights(tmp_path / "missing.safetensors", encoder, "image")


def test_a_simulation_checks_init_files_before_it_starts(tmp_path, capsys):
    flat = ["--set", 'model.init.image="' + str(tmp_path / "missing.safetensors") + '"', "--out", str(tmp_path / "run")]
    assert main(["simulate", *flat]) == 2
    assert "model.init.image" in capsys.readouterr().err and not (tmp_path / "run").exists()
