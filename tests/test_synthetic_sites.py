"""``fedfuse data synth``: synthetic site folders that hold only the modalities named, valid, with train and test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.data import synthetic
from common.data.site_folders import load_site, validate_site
from common.data.synthetic_sites import parse_sites, write_synthetic_sites
from common.errors import DataError
from fedfuse.cli import main

SPEC = "berlin=image+signal,paris=signal,rome=tabular+image"


def test_parse_sites_keeps_site_order_and_puts_modalities_in_schema_order():
    assert parse_sites(SPEC) == {"berlin": ("image", "signal"), "paris": ("signal",), "rome": ("image", "tabular")}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "--sites is empty"),
        ("berlin", "'berlin' names no modalities"),
        ("berlin=", "'berlin=' names no modalities"),
        ("berlin=photo", "unknown modality 'photo'; the synthetic dataset has image, signal, tabular, text"),
        ("berlin=image+image", "names a modality twice"),
        ("berlin=image,berlin=signal", "site 'berlin' is given twice"),
        ("../x=image", "site name '../x' must start with a letter or digit"),
        (".hidden=image", "site name '.hidden'"),
    ],
)
def test_parse_sites_refuses_a_bad_spec_and_says_why(spec, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_sites(spec)


def test_cli_writes_valid_sites_with_only_their_modalities(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "sites"
    assert main(["data", "synth", "--out", str(out), "--sites", SPEC, "--samples", "50", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert 'federation.modalities = "image,signal,tabular"' in printed
    assert sorted(p.name for p in out.iterdir()) == ["berlin", "paris", "rome"]
    for name, modalities in parse_sites(SPEC).items():
        assert validate_site(out / name) == []
        site = load_site(out / name)
        assert site.name == name and site.schema.names == modalities
        assert sorted(p.name for p in (out / name).glob("*.npy")) == sorted(f"{m}.npy" for m in modalities)
        assert site.split.count("train") == 40 and site.split.count("test") == 10
        assert bool(site.data.mask.all())  # every sample has each modality of its site
    assert main(["data", "validate", str(out)]) == 0  # the federation's schemas combine


def test_sites_get_different_samples_and_a_seed_repeats_them(tmp_path: Path):
    a = write_synthetic_sites(tmp_path / "a", {"x": ("signal",), "y": ("signal",)}, samples=20, seed=1)
    b = write_synthetic_sites(tmp_path / "b", {"x": ("signal",)}, samples=20, seed=1)
    x, y, again = (load_site(p).data.inputs["signal"] for p in (a["x"], a["y"], b["x"]))
    assert not bool((x == y).all()) and bool((x == again).all())


def test_an_existing_non_empty_folder_is_refused_and_left_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "sites"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(out), "--sites", "a=image"]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["sites"]  # no hidden leftovers


def test_an_empty_folder_is_filled_and_too_few_samples_are_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert list(write_synthetic_sites(tmp_path / "empty", {"a": ("image",)}, samples=10)) == ["a"]
    with pytest.raises(DataError, match="--samples must be at least 10"):
        write_synthetic_sites(tmp_path / "small", {"a": ("image",)}, samples=9)
    assert not (tmp_path / "small").exists()


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import common.data.site_folders

    real = common.data.site_folders.write_site
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(common.data.site_folders, "write_site", fail_second)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_sites(tmp_path / "sites", {"a": ("image",), "b": ("signal",)}, samples=10)
    assert list(tmp_path.iterdir()) == []


def test_the_optional_text_modality_is_a_padded_sentence_whose_keywords_tell_its_classes_apart():
    # Execute
    plain, data = synthetic.generate(600, seed=5), synthetic.generate(600, seed=5, text=True)
    # Assert: the other modalities are those of the three-modality dataset; text is (N, L) int64 in the vocabulary
    assert data.schema.names == ("image", "signal", "tabular", "text") and bool(data.mask.all())
    assert all(torch.equal(plain.inputs[m], data.inputs[m]) for m in plain.schema.names)
    tokens = data.inputs["text"]
    assert tokens.shape == (600, synthetic.TEXT_LENGTH) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < synthetic.TEXT_VOCAB
    words = tokens != 0
    assert bool((words.cummin(dim=1).values == words).all())  # padding only after the sentence
    assert bool((words.sum(dim=1) >= 5).all())
    keywords = ((tokens >= 1) & (tokens <= 3)).sum(dim=1)
    assert bool((keywords == synthetic.TEXT_KEYWORDS).all())
    # the most frequent keyword names the view of the class (classes 1 and 3 apart, the rest shared) mostly
    counts = torch.stack([(tokens == k).sum(dim=1) for k in (1, 2, 3)], dim=1)
    view = torch.tensor(synthetic.VIEWS["text"])[data.labels]
    assert (counts.argmax(dim=1) == view).float().mean() > 0.8


def test_cli_writes_text_sites_that_validate_and_combine(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "sites"
    assert main(["data", "synth", "--out", str(out), "--sites", "a=image+text,b=text", "--samples", "30"]) == 0
    assert 'federation.modalities = "image,text"' in capsys.readouterr().out
    site = load_site(out / "b")
    assert site.schema.names == ("text",) and site.schema.modalities[0].vocab_size == synthetic.TEXT_VOCAB
    assert main(["data", "validate", str(out)]) == 0


@pytest.mark.slow
def test_the_transformer_text_encoder_trains_on_synthetic_text_sites_in_a_simulation(tmp_path: Path):
    # Prepare: three sites holding text (one text only), the built-in transformer as the text encoder, shared
    sites = tmp_path / "sites"
    write_synthetic_sites(sites, {"a": ("tabular", "text"), "b": ("text",), "c": ("image", "text")}, samples=300, seed=2)
    out = tmp_path / "run"
    settings = {
        "data.dataset": f'"{sites}"',
        "model.encoder.text": '"transformer"',
        "encoders": '"federated"',
        "num-server-rounds": "4",
        "train.local-epochs": "2",
        "dp.epsilon": "8",
    }
    # Execute
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    assert main(["simulate", "--out", str(out), "--quiet", *args]) == 0
    # Assert: a private run over the text sites; the shared text encoder learnt beyond chance (1/6; text alone
    # tells classes 1 and 3 from the rest: at best 1/2; measured 0.41 after 4 rounds at epsilon 8)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert all(0 < c["epsilon"] <= 8 for c in results["privacy"]["clients"].values())
    text_only = results["final"]["pooled"]["by_modalities"]["text"]  # every site's 60 test samples, text alone
    assert text_only["num_examples"] == 180 and text_only["accuracy"] > 0.3
