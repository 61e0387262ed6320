"""The README's worked example of a custom encoder (Bring your own encoder), run from the README's own text."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from common.data import synthetic
from common.model.validation import check_encoder, site_refusal
from fedfuse.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FACTORY = "my_encoders:small_cnn"


def readme_section() -> str:
    text = README.read_text()
    return text[text.index("### Worked example") : text.index("### Transfer learning")]


def example_module(folder: Path, *, batch_norm: bool = False) -> Path:
    """The README's my_encoders.py in ``folder`` (optionally with the BatchNorm the README says is refused)."""
    code = re.search(r"```python\n# my_encoders.py\n(.*?)```", readme_section(), re.S).group(1)
    if batch_norm:
        assert "nn.GroupNorm(4, 16)" in code
        code = code.replace("nn.GroupNorm(4, 16)", "nn.BatchNorm2d(16)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_encoders.py").write_text(code)
    return folder


@pytest.fixture
def importable(monkeypatch):
    """Put a folder first on sys.path (and PYTHONPATH, for Ray's workers); forget my_encoders afterwards."""

    def add(folder: Path) -> None:
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setenv("PYTHONPATH", str(folder))
        sys.modules.pop("my_encoders", None)
        check_encoder.cache_clear()

    yield add
    sys.modules.pop("my_encoders", None)
    check_encoder.cache_clear()


def test_the_example_encoder_passes_the_checks_under_hooks(tmp_path, importable):
    importable(example_module(tmp_path / "ok"))
    image = synthetic.schema().modalities[0]
    check_encoder(image, 32, FACTORY, "hooks")


def test_the_batch_norm_variant_is_refused_with_the_readme_text(tmp_path, importable, capsys):
    importable(example_module(tmp_path / "bn", batch_norm=True))
    quoted = re.search(r"```\n(fedfuse simulate: error: .*?)\n```", readme_section(), re.S).group(1)
    status = main(
        [
            "simulate",
            "--set",
            f'model.encoder.image="{FACTORY}"',
            "--set",
            'train.grad-sample-mode="hooks"',
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert status == 2 and capsys.readouterr().err.strip() == quoted
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_the_allowlist_refusal_is_the_readme_text():
    quoted = re.search(r"replies `policy-refused`: `(.*?)`\.", readme_section(), re.S).group(1)
    assert site_refusal({"image": FACTORY}, {}) == " ".join(quoted.split())


@pytest.mark.slow
def test_a_simulation_trains_with_the_example_encoder_end_to_end(tmp_path, importable):
    importable(example_module(tmp_path / "ok"))
    out = tmp_path / "run"
    status = main(
        [
            "simulate",
            "--quiet",
            "--out",
            str(out),
            "--set",
            f'model.encoder.image="{FACTORY}"',
            "--set",
            'train.grad-sample-mode="hooks"',
            "--set",
            "num-server-rounds=1",
            "--set",
            "data.num-clients=2",
            "--set",
            "data.samples-per-client=120",
            "--set",
            'data.groups="image+signal;image"',
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert status == 0 and results["status"] == "completed"
    assert results["config"]["model.encoder"] == f"image={FACTORY}"
    from safetensors.torch import load_file

    for client in ("client-00", "client-01"):
        state = load_file(str(out / "clients" / client / "model.safetensors"))
        assert "encoders.image.features.1.weight" in state  # the example's GroupNorm: its encoder trained there
    assert all(c["epsilon"] <= 8.0 for c in results["privacy"]["clients"].values())
