"""Bring your own data: the README's command on real site folders, end to end (slow; needs ../shared/data)."""

from __future__ import annotations

import json
import shutil

import pytest

from common.data.site_folders import load_site
from fedfuse.cli import main
from tests.test_bench_real import DATA, _needs


@pytest.mark.slow
def test_the_readme_command_runs_on_real_site_folders_and_leaves_them_as_they_are(tmp_path, capsys):
    """Three HAPT training subjects and one test-only subject, nothing set but the dataset and two rounds."""
    _needs("hapt/RawData/labels.txt")
    from common.data.importers.hapt import import_hapt

    # Prepare
    sites = tmp_path / "hapt"
    import_hapt(DATA / "hapt", sites, classes=6)
    fed = tmp_path / "fed"
    for name in ("subject-01", "subject-03", "subject-05", "subject-02"):  # 02: a publisher's test subject
        shutil.copytree(sites / name, fed / name)
    tests = sum(len(load_site(fed / s).part("test")) for s in ("subject-01", "subject-03", "subject-05"))
    out = tmp_path / "run"
    # Execute: `fedfuse simulate --set data.dataset=DIR` (two rounds to keep it short)
    status = main(["simulate", "--out", str(out), "--set", f"data.dataset={fed}", "--set", "num-server-rounds=2"])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    # Assert: it ran; every site kept both modalities; no sample lost one; the test-only site is named
    assert status == 0 and results["status"] == "completed"
    assert {c["modalities"] == ["acc", "gyro"] for c in results["privacy"]["clients"].values()} == {True}
    assert results["federation"]["data_changes"] == []
    assert list(results["federation"]["sites_not_training"]) == ["subject-02"]
    pooled = results["final"]["pooled"]
    assert pooled["num_examples"] == tests == sum(pooled["per_class"]["support"])
    assert {k: v["num_examples"] for k, v in pooled["by_modalities"].items()} == {"acc": tests, "gyro": tests, "acc+gyro": tests}
    assert "each sample's own modalities" in printed and "macro-F1 (client mean)" in printed
