"""A modality's fixed scaling in the schema, and `fedfuse data inspect` catching unit mistakes."""

import json

import pytest
import torch

from common.data import synthetic
from common.data.schema import DatasetSchema, ModalitySpec
from common.data.site_folders import federation_schema, load_site, validate_site, write_site
from common.data.value_ranges import modality_ranges, range_notes
from common.errors import SchemaError
from common.model.multimodal import ModelConfig, MultimodalModel
from fedfuse.cli import main


def with_scaling(data, name, offset, scale):
    """The same samples under a schema declaring ``name``'s scaling."""
    specs = tuple(
        ModalitySpec(s.name, s.kind, s.shape, s.dtype, s.vocab_size, (offset, scale) if s.name == name else None)
        for s in data.schema.modalities
    )
    return type(data)(DatasetSchema(specs, data.schema.labels), data.inputs, data.mask, data.labels)


def test_scaling_is_read_written_and_checked():
    spec = ModalitySpec.from_dict("depth", {"kind": "tabular", "shape": [4], "scaling": {"offset": 500, "scale": 1000}})
    assert spec.scaling == (500.0, 1000.0)
    assert ModalitySpec.from_dict("depth", spec.to_dict()) == spec
    for bad, message in (
        ({"offset": 0, "scale": 0}, "scale > 0"),
        ({"scale": 2}, "must be"),
        ({"offset": float("nan"), "scale": 1}, "finite offset"),
    ):
        with pytest.raises(SchemaError, match=message):
            ModalitySpec.from_dict("depth", {"kind": "tabular", "shape": [4], "scaling": bad})
    with pytest.raises(SchemaError, match="not to token ids"):
        ModalitySpec("words", "text", (5,), "int64", 10, (0.0, 1.0))


def test_the_model_sees_scaled_inputs_at_every_site_and_sites_must_agree(tmp_path):
    # Prepare: tabular values in "millimetres"; the schema declares (offset 0, scale 1000)
    data = synthetic.generate(20, seed=2)
    raw = type(data)(data.schema, {**data.inputs, "tabular": data.inputs["tabular"] * 1000}, data.mask, data.labels)
    scaled_schema = with_scaling(raw, "tabular", 0.0, 1000.0)
    # Execute: the same weights on the raw data with the declared scaling, and on data already in metres
    a = MultimodalModel(scaled_schema.schema, ModelConfig(), seed=0)
    b = MultimodalModel(data.schema, ModelConfig(), seed=0)
    b.load_state_dict(a.state_dict())  # the same weights (the scaling holds no parameter)
    # Assert
    assert torch.allclose(a(raw.inputs, raw.mask), b(data.inputs, data.mask), atol=1e-5)
    # a site folder keeps the scaling; two sites that declare different ones cannot be combined
    write_site(tmp_path / "a", scaled_schema, ["train"] * 20, name="a")
    write_site(tmp_path / "b", raw, ["train"] * 20, name="b")
    assert validate_site(tmp_path / "a") == []
    assert load_site(tmp_path / "a").schema["tabular"].scaling == (0.0, 1000.0)
    with pytest.raises(SchemaError, match="modality 'tabular' differs between sites 'a'.*scaling"):
        federation_schema([load_site(tmp_path / "a"), load_site(tmp_path / "b")])


def test_a_bad_scaling_is_a_validation_problem_with_its_field(tmp_path):
    write_site(tmp_path / "a", synthetic.generate(10, seed=2), ["train"] * 10, name="a")
    doc = json.loads((tmp_path / "a" / "schema.json").read_text())
    doc["modalities"]["signal"]["scaling"] = {"offset": 0, "scale": -1}
    (tmp_path / "a" / "schema.json").write_text(json.dumps(doc))
    problems = [str(p) for p in validate_site(tmp_path / "a")]
    assert any(p.startswith("schema.json, modalities.signal:") and "scale > 0" in p for p in problems)


def test_inspect_flags_raw_units_and_units_that_differ_across_sites(tmp_path, capsys):
    # Prepare: site a records tabular in millimetres, site b in metres
    data = synthetic.generate(30, seed=4)
    mm = type(data)(data.schema, {**data.inputs, "tabular": data.inputs["tabular"] * 1000}, data.mask, data.labels)
    write_site(tmp_path / "a", mm, ["train"] * 30, name="a")
    write_site(tmp_path / "b", data, ["train"] * 30, name="b")
    # Execute
    ranges = {s: modality_ranges(load_site(tmp_path / s)) for s in ("a", "b")}
    notes = range_notes(ranges)
    # Assert: the range is over present samples only; both mistakes are named
    tab = next(r for r in ranges["a"] if r.modality == "tabular")
    assert tab.present == int(data.mask[:, data.schema.index("tabular")].sum())
    assert any(n.startswith("a/tabular: values of order") and "scaling" in n for n in notes)
    assert any(n.startswith("tabular: values of order") and "different units" in n for n in notes)
    assert not any(n.startswith("b/") for n in notes)
    # with the scaling declared, site a's values reach the encoder at order 1 and nothing is flagged
    write_site(tmp_path / "a", with_scaling(mm, "tabular", 0.0, 1000.0), ["train"] * 30, name="a", overwrite=True)
    assert main(["data", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "declared" in out and "nothing is sent" in out
