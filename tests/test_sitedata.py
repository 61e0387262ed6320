"""Tests of the site folder format: round trips, every validator problem, atomic writes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import site_folders as sitedata
from common.data.samples import MultimodalData
from common.data.schema import DatasetSchema, ModalitySpec
from common.data.site_folders import (
    Problem,
    federation_schema,
    load_federation,
    load_site,
    summarize_site,
    validate_site,
    write_site,
)
from common.errors import DataError, SchemaError
from fedfuse.cli import main

LABELS = ("cat", "dog", "eel")
IMAGE = ModalitySpec("image", "image", (1, 2, 2))
TEXT = ModalitySpec("text", "text", (3,), dtype="int64", vocab_size=5)


def make_data(n: int = 6, specs: tuple[ModalitySpec, ...] = (IMAGE, TEXT)) -> MultimodalData:
    """``n`` samples; with two modalities, sample 1 lacks the image and sample 2 the text."""
    schema = DatasetSchema(specs, LABELS)
    inputs = {}
    for s in specs:
        if s.kind == "text":
            inputs[s.name] = (torch.arange(n * 3).reshape(n, 3) % 4 + 1).to(torch.int64)
        else:
            inputs[s.name] = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2) / 10
    mask = torch.ones((n, len(specs)), dtype=torch.bool)
    if len(specs) == 2:
        mask[1, 0] = False
        mask[2, 1] = False
    return MultimodalData(schema, inputs, mask, torch.arange(n) % 3)


SPLIT = ("train", "train", "train", "train", "test", "test")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A valid site folder with 6 samples (image + text) to break in each test."""
    return write_site(tmp_path / "site", make_data(), SPLIT, name="clinic-a")


def edit_index(site: Path, row: int, column: str, value: str) -> None:
    """Set one cell of index.csv (row 0 = first sample)."""
    lines = (site / "index.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row + 1].split(",")
    cells[header.index(column)] = value
    lines[row + 1] = ",".join(cells)
    (site / "index.csv").write_text("\n".join(lines) + "\n")


def edit_schema(site: Path, **fields) -> None:
    doc = json.loads((site / "schema.json").read_text())
    doc.update(fields)
    (site / "schema.json").write_text(json.dumps(doc))


def where(problems: list[Problem]) -> set[tuple[str, str]]:
    return {(p.file, p.field) for p in problems}


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_round_trip_with_samples_lacking_a_modality(tmp_path: Path) -> None:
    # Prepare
    data = make_data()
    ids = [f"s{i}" for i in range(6)]
    # Execute
    path = write_site(tmp_path / "a", data, SPLIT, name="clinic-a", sample_ids=ids)
    site = load_site(path)
    # Assert
    assert validate_site(path) == []
    assert (site.name, site.path, site.split) == ("clinic-a", path, SPLIT)
    assert site.schema == data.schema
    assert torch.equal(site.data.mask, data.mask) and torch.equal(site.data.labels, data.labels)
    for name in ("image", "text"):
        assert torch.equal(site.data.inputs[name], data.inputs[name])
    assert float(site.data.inputs["image"][1].abs().sum()) == 0.0  # absent rows stored as zeros
    header, first = (path / "index.csv").read_text().splitlines()[:2]
    assert header == "sample,split,label,image,text"
    assert first == "s0,train,0,1,1"
    assert json.loads((path / "schema.json").read_text())["splits"] == ["train", "test"]
    assert len(site.part("train")) == 4 and len(site.part("test")) == 2
    assert torch.equal(site.part("test").labels, torch.tensor([1, 2]))
    assert site.part("val") is None


def test_round_trip_site_lacking_a_modality_entirely(tmp_path: Path) -> None:
    # Prepare
    data = make_data(specs=(TEXT,))
    # Execute
    path = write_site(tmp_path / "b", data, ["train"] * 6, name="clinic-b")
    site = load_site(path)
    # Assert
    assert sorted(p.name for p in path.iterdir()) == ["index.csv", "schema.json", "text.npy"]
    assert list(json.loads((path / "schema.json").read_text())["modalities"]) == ["text"]
    assert site.schema.names == ("text",)
    assert torch.equal(site.data.inputs["text"], data.inputs["text"])


def test_summarize_site(site: Path) -> None:
    # Execute
    summary = summarize_site(load_site(site))
    # Assert
    assert summary == {
        "name": "clinic-a",
        "path": str(site),
        "samples": 6,
        "splits": {"test": 2, "train": 4},
        "split_roles": {"test": "held-out evaluation", "train": "training"},
        "presence": {"image": 5, "text": 5},
        "classes": {"cat": 2, "dog": 2, "eel": 2},
    }


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def test_write_refuses_existing_folder_unless_overwrite(site: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="already exists"):
        write_site(site, make_data(4), ["train"] * 4, name="x")
    write_site(site, make_data(4), ["train"] * 4, name="new", overwrite=True)
    assert load_site(site).name == "new" and len(load_site(site).data) == 4
    assert [p.name for p in site.parent.iterdir()] == ["site"]  # no temporary folders left


def test_write_rejects_bad_split_and_ids(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="split has 2 entries for 6 samples"):
        write_site(tmp_path / "x", make_data(), ["train", "test"], name="x")
    with pytest.raises(DataError, match="unique"):
        write_site(tmp_path / "x", make_data(), SPLIT, name="x", sample_ids=["a"] * 6)
    assert not (tmp_path / "x").exists()


def _failing_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """np.save that fails on its second call (the second modality)."""
    real, calls = np.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "save", save)


def test_failed_write_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _failing_save(monkeypatch)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_site(tmp_path / "a", make_data(), SPLIT, name="a")
    # Assert
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_site(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _failing_save(monkeypatch)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_site(site, make_data(4), ["test"] * 4, name="new", overwrite=True)
    # Assert
    assert [p.name for p in site.parent.iterdir()] == ["site"]
    assert load_site(site).name == "clinic-a" and len(load_site(site).data) == 6


# ---------------------------------------------------------------------------
# Validation: one test per kind of problem
# ---------------------------------------------------------------------------


def test_not_a_folder(tmp_path: Path) -> None:
    assert where(validate_site(tmp_path / "nope")) == {(".", "")}


def test_missing_files(site: Path) -> None:
    # Prepare
    for f in ("schema.json", "index.csv"):
        (site / f).unlink()
    # Execute
    problems = validate_site(site)
    # Assert
    assert where(problems) == {("schema.json", ""), ("index.csv", "")}
    assert all("missing" in p.message for p in problems)


def test_missing_modality_array(site: Path) -> None:
    (site / "text.npy").unlink()
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["text.npy: missing; modality 'text' is declared in schema.json"]


def test_malformed_json(site: Path) -> None:
    (site / "schema.json").write_text('{"format": "fedfuse-site",\n "version": }')
    problems = validate_site(site)
    assert where(problems) == {("schema.json", "line 2, column 13")}
    assert "malformed JSON" in problems[0].message


def test_json_not_an_object(site: Path) -> None:
    (site / "schema.json").write_text("[1, 2]")
    assert where(validate_site(site)) == {("schema.json", "")}


def test_malformed_csv(site: Path) -> None:
    edit_index(site, 2, "sample", '"s2"x')
    problems = validate_site(site)
    assert ("index.csv", "row 2") in where(problems)
    assert any("malformed CSV" in p.message for p in problems)


def test_unknown_format_version_and_fields(site: Path) -> None:
    # Prepare
    edit_schema(site, format="other", version=2, colour="red")
    # Execute
    problems = validate_site(site)
    # Assert
    assert where(problems) == {("schema.json", "format"), ("schema.json", "version"), ("schema.json", "colour")}
    assert "newer fedfuse" in next(p.message for p in problems if p.field == "version")


def test_missing_schema_fields(site: Path) -> None:
    doc = json.loads((site / "schema.json").read_text())
    del doc["name"], doc["splits"]
    (site / "schema.json").write_text(json.dumps(doc))
    assert where(validate_site(site)) == {("schema.json", "name"), ("schema.json", "splits")}


def test_schema_errors_each_reported(site: Path) -> None:
    # Prepare: a bad kind, a bad shape, and repeated labels
    edit_schema(
        site,
        modalities={"image": {"kind": "photo", "shape": [1, 2, 2]}, "text": {"kind": "text", "shape": [3]}},
        labels=["cat", "cat"],
    )
    # Execute
    problems = validate_site(site)
    # Assert
    assert where(problems) == {("schema.json", "modalities.image"), ("schema.json", "modalities.text"), ("schema.json", "labels")}
    assert "unknown kind 'photo'" in str(problems[0])


def test_bad_splits(site: Path) -> None:
    edit_schema(site, splits=["train", "train"])
    assert where(validate_site(site)) == {("schema.json", "splits")}


def test_shape_and_dtype_mismatch(site: Path) -> None:
    # Prepare
    np.save(site / "image.npy", np.zeros((6, 1, 3, 3), dtype=np.float32))
    np.save(site / "text.npy", np.zeros((6, 3), dtype=np.int32))
    # Execute
    problems = validate_site(site)
    # Assert
    assert where(problems) == {("image.npy", "shape"), ("text.npy", "dtype")}


def test_unreadable_npy(site: Path) -> None:
    np.save(site / "image.npy", np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    problems = validate_site(site)
    assert where(problems) == {("image.npy", "")}
    assert "not a readable .npy array" in problems[0].message


def test_row_count_disagrees_with_index(site: Path) -> None:
    np.save(site / "image.npy", np.zeros((5, 1, 2, 2), dtype=np.float32))
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["image.npy, rows: 5 rows but index.csv has 6 samples"]


def test_duplicate_sample_ids(site: Path) -> None:
    edit_index(site, 3, "sample", "1")
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["index.csv, row 3, column 'sample': sample id '1' already used in row 1"]


def test_unknown_split(site: Path) -> None:
    edit_index(site, 0, "split", "validation")
    assert where(validate_site(site)) == {("index.csv", "row 0, column 'split'")}


def test_label_out_of_range(site: Path) -> None:
    edit_index(site, 1, "label", "9")
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["index.csv, row 1, column 'label': label 9 is out of range [0, 3)"]


def test_label_not_an_integer(site: Path) -> None:
    edit_index(site, 1, "label", "1.0")
    edit_index(site, 2, "label", "dog")
    problems = validate_site(site)
    assert where(problems) == {("index.csv", "row 1, column 'label'"), ("index.csv", "row 2, column 'label'")}
    assert all("is not an integer" in p.message for p in problems)


def test_presence_not_zero_or_one(site: Path) -> None:
    edit_index(site, 0, "text", "yes")
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["index.csv, row 0, column 'text': presence must be 1 or 0, got 'yes'"]


def test_wrong_number_of_fields(site: Path) -> None:
    lines = (site / "index.csv").read_text().splitlines()
    lines[1] += ",1"
    (site / "index.csv").write_text("\n".join(lines) + "\n")
    assert where(validate_site(site)) == {("index.csv", "row 0")}


def test_non_finite_in_present_row(site: Path) -> None:
    # Prepare: NaN in present sample 3
    x = np.load(site / "image.npy")
    x[3, 0, 1, 1] = np.inf
    np.save(site / "image.npy", x)
    # Execute / Assert
    assert where(validate_site(site)) == {("image.npy", "row 3")}


def test_non_zero_in_absent_row(site: Path) -> None:
    x = np.load(site / "image.npy")
    x[1] = 0.5  # sample 1 lacks the image
    np.save(site / "image.npy", x)
    problems = validate_site(site)
    assert where(problems) == {("image.npy", "row 1")}
    assert "must be zeros" in problems[0].message


def test_token_ids_out_of_range(site: Path) -> None:
    x = np.load(site / "text.npy")
    x[0, 2], x[4, 0] = 5, -1
    np.save(site / "text.npy", x)
    problems = validate_site(site)
    assert where(problems) == {("text.npy", "row 0"), ("text.npy", "row 4")}
    assert "outside [0, 5)" in problems[0].message


def test_sample_with_no_modality(site: Path) -> None:
    edit_index(site, 1, "text", "0")  # sample 1 already lacks the image
    np.save(site / "text.npy", np.where(np.arange(6)[:, None] == 1, 0, np.load(site / "text.npy")))
    problems = validate_site(site)
    assert [str(p) for p in problems] == ["index.csv, row 1: sample has no modality present; drop it or mark a modality present"]


def test_array_for_undeclared_modality(site: Path) -> None:
    np.save(site / "audio.npy", np.zeros((6, 2, 2), dtype=np.float32))
    assert where(validate_site(site)) == {("audio.npy", "")}


def test_presence_columns_disagree_with_schema(site: Path) -> None:
    # Prepare: an unknown column 'audio' in place of 'text'
    lines = (site / "index.csv").read_text().splitlines()
    lines[0] = "sample,split,label,image,audio"
    (site / "index.csv").write_text("\n".join(lines) + "\n")
    # Execute
    problems = validate_site(site)
    # Assert
    assert ("index.csv", "column 'audio'") in where(problems)
    assert "index.csv, header: no presence column for modality 'text' declared in schema.json" in map(str, problems)


def test_presence_columns_out_of_order(site: Path) -> None:
    lines = (site / "index.csv").read_text().splitlines()
    swapped = [",".join(c[:3] + [c[4], c[3]]) for c in (line.split(",") for line in lines)]
    (site / "index.csv").write_text("\n".join(swapped) + "\n")
    problems = validate_site(site)
    assert where(problems) == {("index.csv", "header")}
    assert "schema.json's modality order" in problems[0].message


def test_empty_index(site: Path) -> None:
    (site / "index.csv").write_text("sample,split,label,image,text\n")
    problems = validate_site(site)
    assert ("index.csv", "") in where(problems)


def test_several_problems_all_reported(site: Path) -> None:
    # Prepare: one problem in each file
    edit_schema(site, version=0)
    edit_index(site, 1, "label", "9")
    edit_index(site, 5, "split", "dev")
    np.save(site / "image.npy", np.zeros((6, 1, 2, 2), dtype=np.float64))
    (site / "text.npy").unlink()
    # Execute
    problems = validate_site(site)
    # Assert
    assert where(problems) == {
        ("schema.json", "version"),
        ("index.csv", "row 1, column 'label'"),
        ("index.csv", "row 5, column 'split'"),
        ("image.npy", "dtype"),
        ("text.npy", ""),
    }


def test_many_bad_rows_are_counted(tmp_path: Path) -> None:
    # Prepare: 30 labels out of range
    path = write_site(tmp_path / "s", make_data(30), ["train"] * 30, name="s")
    for i in range(30):
        edit_index(path, i, "label", "7")
    # Execute
    problems = validate_site(path)
    # Assert
    assert len(problems) == sitedata.MAX_LISTED + 1
    assert str(problems[-1]) == "index.csv: 20 more row(s) with the same problem: label out of range"


def test_large_arrays_checked_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: chunks of 2 rows; a NaN in the last chunk
    monkeypatch.setattr(sitedata, "CHUNK_BYTES", 2 * 16)
    path = write_site(tmp_path / "s", make_data(9, specs=(IMAGE,)), ["train"] * 9, name="s")
    x = np.load(path / "image.npy")
    x[8, 0, 0, 0] = np.nan
    np.save(path / "image.npy", x)
    # Execute / Assert
    assert where(validate_site(path)) == {("image.npy", "row 8")}


def test_load_site_lists_every_problem(site: Path) -> None:
    edit_index(site, 1, "label", "9")
    edit_index(site, 2, "split", "dev")
    with pytest.raises(DataError) as info:
        load_site(site)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "index.csv, row 1, column 'label': label 9 is out of range [0, 3)" in message
    assert "row 2, column 'split'" in message


# ---------------------------------------------------------------------------
# Federations
# ---------------------------------------------------------------------------


def test_load_federation_and_union_schema(tmp_path: Path) -> None:
    # Prepare: b has both modalities, a only text
    write_site(tmp_path / "b", make_data(), SPLIT, name="b")
    write_site(tmp_path / "a", make_data(specs=(TEXT,)), ["train"] * 6, name="a")
    (tmp_path / ".a.tmp-123").mkdir()  # an unfinished write is not a site
    # Execute
    sites = load_federation(tmp_path)
    schema = federation_schema(sites)
    # Assert
    assert [s.name for s in sites] == ["a", "b"]
    assert schema.names == ("text", "image") and schema.labels == LABELS


def test_load_federation_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no site folders"):
        load_federation(tmp_path)
    write_site(tmp_path / "good", make_data(), SPLIT, name="good")
    bad = write_site(tmp_path / "bad", make_data(), SPLIT, name="bad")
    edit_index(bad, 0, "label", "9")
    with pytest.raises(DataError, match=r"(?s)1 of 2 site\(s\).*site 'bad'.*label 9"):
        load_federation(tmp_path)
    with pytest.raises(DataError, match="single site folder"):
        load_federation(tmp_path / "good")


def test_federation_schema_conflicts(tmp_path: Path) -> None:
    # Prepare
    a = load_site(write_site(tmp_path / "a", make_data(), SPLIT, name="a"))
    other_labels = make_data()
    other_labels = MultimodalData(
        DatasetSchema(other_labels.schema.modalities, ("x", "y", "z")),
        other_labels.inputs,
        other_labels.mask,
        other_labels.labels,
    )
    b = load_site(write_site(tmp_path / "b", other_labels, SPLIT, name="b"))
    wide = ModalitySpec("text", "text", (3,), dtype="int64", vocab_size=9)
    c = load_site(write_site(tmp_path / "c", make_data(specs=(wide,)), ["train"] * 6, name="c"))
    # Execute / Assert
    with pytest.raises(SchemaError, match="sites 'a' and 'b' have different labels"):
        federation_schema([a, b])
    with pytest.raises(SchemaError, match="modality 'text' differs between sites 'a'.*and 'c'"):
        federation_schema([a, c])


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_validate_valid_site(site: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "validate", str(site)]) == 0
    out = capsys.readouterr().out
    assert "clinic-a: 6 samples (test 2, train 4)" in out
    assert "presence: image 5, text 5" in out and "classes: cat 2, dog 2, eel 2" in out


def test_cli_validate_reports_problems(site: Path, capsys: pytest.CaptureFixture) -> None:
    edit_index(site, 1, "label", "9")
    (site / "text.npy").unlink()
    assert main(["data", "validate", str(site)]) == 1
    out = capsys.readouterr().out
    assert "index.csv, row 1, column 'label': label 9 is out of range [0, 3)" in out
    assert "text.npy: missing" in out


def test_cli_validate_folder_of_sites(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_site(tmp_path / "a", make_data(), SPLIT, name="a")
    bad = write_site(tmp_path / "b", make_data(), SPLIT, name="b")
    assert main(["data", "validate", str(tmp_path)]) == 0
    edit_index(bad, 0, "split", "dev")
    assert main(["data", "validate", "--json", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    report = json.loads(out[out.index('{\n  "problems"') :])
    assert report["problems"]["b"][0]["field"] == "row 0, column 'split'"


def test_cli_validate_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["data", "validate", str(tmp_path / "nope")]) == 2


def test_cli_validate_says_what_each_split_is_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare: a site with a 'val' split, and a test-only site whose split is named 'testing'
    n = len(make_data())
    write_site(tmp_path / "a", make_data(), ["train"] * (n - 2) + ["val", "test"], name="a")
    write_site(tmp_path / "b", make_data(), ["testing"] * n, name="b")
    # Execute
    assert main(["data", "validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # Assert: each split's role, and a note for the site that will not train
    assert "splits: test: held-out evaluation; train: training; val: not used" in out
    assert "note: no 'train' samples: in a simulation this site takes no part in training" in out
    assert "'testing' is not used (did you mean 'test'?)" in out
