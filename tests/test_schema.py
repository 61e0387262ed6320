"""Schema: modality specs and dataset schemas are validated with clear errors."""

import pytest

from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import SchemaError


def test_round_trip_through_dict():
    schema = DatasetSchema(
        (ModalitySpec("acc", "signal", (3, 128)), ModalitySpec("notes", "text", (16,), "int64", vocab_size=100)),
        ("walk", "sit"),
    )
    again = DatasetSchema.from_dict(schema.to_dict())
    assert again == schema
    assert again.names == ("acc", "notes")
    assert again.index("notes") == 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(name="Image", kind="image", shape=(1, 8, 8)), "lower-case"),
        (dict(name="img", kind="video", shape=(1, 8, 8)), "unknown kind 'video'"),
        (dict(name="img", kind="image", shape=(8, 8)), "shape of 3 positive integers"),
        (dict(name="img", kind="image", shape=(1, 0, 8)), "shape of 3 positive integers"),
        (dict(name="tab", kind="tabular", shape=(4,), dtype="int64"), "needs dtype float32"),
        (dict(name="txt", kind="text", shape=(4,), dtype="int64"), "vocab_size"),
        (dict(name="tab", kind="tabular", shape=(4,), vocab_size=10), "applies to kind 'text' only"),
    ],
)
def test_bad_modality_specs_are_named(kwargs, fragment):
    with pytest.raises(SchemaError, match=fragment):
        ModalitySpec(**kwargs)


def test_duplicate_names_and_labels_rejected():
    spec = ModalitySpec("a", "tabular", (2,))
    with pytest.raises(SchemaError, match="unique"):
        DatasetSchema((spec, spec), ("x", "y"))
    with pytest.raises(SchemaError, match="unique"):
        DatasetSchema((spec,), ("x", "x"))
    with pytest.raises(SchemaError, match="at least 2 labels"):
        DatasetSchema((spec,), ("x",))


def test_unknown_fields_and_modalities_are_reported():
    with pytest.raises(SchemaError, match=r"unknown field\(s\) \['colour'\]"):
        DatasetSchema.from_dict({"modalities": {"a": {"kind": "tabular", "shape": [2], "colour": 1}}, "labels": ["x", "y"]})
    schema = DatasetSchema((ModalitySpec("a", "tabular", (2,)),), ("x", "y"))
    with pytest.raises(SchemaError, match="unknown modality 'b'"):
        schema["b"]


def test_restrict_keeps_schema_order():
    schema = DatasetSchema(
        (ModalitySpec("a", "tabular", (2,)), ModalitySpec("b", "tabular", (3,)), ModalitySpec("c", "tabular", (4,))),
        ("x", "y"),
    )
    assert schema.restrict(["c", "a"]).names == ("a", "c")
