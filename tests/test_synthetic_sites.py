"""``fedfuse data synth``: synthetic site folders that hold only the modalities named, valid, with train and test."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        ("berlin=photo", "unknown modality 'photo'; the synthetic dataset has image, signal, tabular"),
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
