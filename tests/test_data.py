"""The data model: zero-filled absent modalities, a presence mask, and clear errors for bad input."""

import pytest
import torch

from common.data.samples import MultimodalData, modality_subsets, subset_key
from common.data.schema import DatasetSchema, ModalitySpec
from common.errors import DataError

SCHEMA = DatasetSchema((ModalitySpec("img", "image", (1, 4, 4)), ModalitySpec("tab", "tabular", (3,))), ("a", "b"))


def sample(img=True, tab=True, label=0):
    inputs = {}
    if img:
        inputs["img"] = torch.ones(1, 4, 4)
    if tab:
        inputs["tab"] = torch.full((3,), 2.0)
    return {"inputs": inputs, "label": label}


def test_missing_modality_is_zero_filled_and_masked():
    data = MultimodalData.from_samples(SCHEMA, [sample(), sample(img=False, label=1)])
    assert data.mask.tolist() == [[True, True], [False, True]]
    assert data.inputs["img"][1].abs().sum() == 0
    assert data.inputs["img"][0].sum() == 16
    assert data[1]["label"] == 1


def test_constructor_zero_fills_absent_rows_without_touching_callers_dict():
    inputs = {"img": torch.ones(2, 1, 4, 4), "tab": torch.ones(2, 3)}
    mask = torch.tensor([[True, False], [True, True]])
    data = MultimodalData(SCHEMA, inputs, mask, torch.tensor([0, 1]))
    assert data.inputs["tab"][0].abs().sum() == 0
    assert inputs["tab"][0].sum() == 3  # caller's tensor untouched


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"inputs": {"img": torch.ones(1, 4, 4), "audio": torch.ones(5)}, "label": 0}, "declares modalities \\['audio'\\]"),
        ({"inputs": {"tab": torch.ones(4)}, "label": 0}, "expected shape \\[3\\]"),
        ({"inputs": {"tab": torch.ones(3, dtype=torch.float64)}, "label": 0}, "expected dtype float32"),
        ({"inputs": {}, "label": 0}, "no modality present"),
        ({"inputs": {"tab": torch.ones(3)}, "label": 2}, "labels must lie in \\[0, 2\\)"),
    ],
)
def test_bad_samples_get_clear_errors(bad, fragment):
    with pytest.raises(DataError, match=fragment):
        MultimodalData.from_samples(SCHEMA, [sample(), bad])


def test_empty_dataset_and_non_finite_values_rejected():
    with pytest.raises(DataError, match="empty"):
        MultimodalData.from_samples(SCHEMA, [])
    inputs = {"img": torch.ones(1, 1, 4, 4), "tab": torch.tensor([[1.0, float("nan"), 0.0]])}
    with pytest.raises(DataError, match="'tab': contains NaN"):
        MultimodalData(SCHEMA, inputs, torch.tensor([[True, True]]), torch.tensor([0]))


def test_restrict_drops_samples_left_without_modalities():
    data = MultimodalData.from_samples(SCHEMA, [sample(), sample(tab=False), sample(img=False)])
    only_tab = data.restrict(["tab"])
    assert only_tab.schema.names == ("tab",)
    assert len(only_tab) == 2
    assert data.presence() == {"img": 2, "tab": 2}


def test_subsets_are_all_non_empty_combinations_in_order():
    assert [subset_key(s) for s in modality_subsets(("image", "signal", "tabular"))] == [
        "image",
        "signal",
        "tabular",
        "image+signal",
        "image+tabular",
        "signal+tabular",
        "image+signal+tabular",
    ]
