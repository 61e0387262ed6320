"""A site runs only the app code it installed and reviewed (common/provenance.py); a real SuperNode: tests/test_deploy.py."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from common.provenance import UNTRUSTED_APP_MARK, ReviewedApp, UntrustedAppError, installed_root

ROOT = Path(__file__).resolve().parents[1]


def app_copy(dest: Path) -> Path:
    """A copy of this checkout's tracked files: what an operator would build a FAB from."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def with_file(fab: bytes, name: str, data: bytes) -> bytes:
    """The FAB with one more file (not listed in Flower's manifest: the check reads the archive itself)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> bytes:
    return build_fab_from_disk(app_copy(tmp_path_factory.mktemp("app")))


def test_the_installed_checkout_is_what_a_site_reviewed():
    assert installed_root() == ROOT


def test_a_fab_built_from_the_installed_checkout_is_accepted(genuine):
    reviewed = ReviewedApp(ROOT)
    assert reviewed.problems(genuine) == []
    reviewed.check(genuine)  # no error


def test_a_fab_with_modified_client_code_is_refused(tmp_path):
    app = app_copy(tmp_path / "app")
    handlers = app / "client" / "handlers.py"
    handlers.write_text(handlers.read_text() + "\nUPLOAD = True  # a malicious operator's change\n")
    fab = build_fab_from_disk(app)
    with pytest.raises(UntrustedAppError, match=rf"{UNTRUSTED_APP_MARK}: .*client/handlers.py: differs from this site's copy"):
        ReviewedApp(ROOT).check(fab)


@pytest.mark.parametrize(
    "name, data, problem",
    [
        ("common/exfiltrate.py", b"import os\n", "common/exfiltrate.py: code this site does not have"),
        ("opacus.py", b"", "opacus.py: code this site does not have"),  # would shadow a library
        ("client/_speedups.so", b"\x7fELF", "client/_speedups.so: not a file type"),
        ("evil.pth", b"import os", "evil.pth: not a file type"),
        ("../outside.py", b"", "../outside.py: a path outside the app"),
    ],
)
def test_code_the_site_does_not_have_is_refused(genuine, name, data, problem):
    problems = ReviewedApp(ROOT).problems(with_file(genuine, name, data))
    assert any(problem in p for p in problems), problems


def test_a_fab_naming_another_client_app_is_refused(tmp_path):
    app = app_copy(tmp_path / "app")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('clientapp = "client.client_app:app"', 'clientapp = "server.server_app:app"')
    )
    problems = ReviewedApp(ROOT).problems(build_fab_from_disk(app))
    assert problems == ["pyproject.toml: [tool.flwr.app.components] names other apps"]


def test_data_files_may_differ(genuine):
    # The run config's defaults and the docs are not code: an operator may change them
    assert ReviewedApp(ROOT).problems(with_file(genuine, "docs/notes.md", b"# anything\n")) == []


def test_not_a_zip_is_refused():
    assert ReviewedApp(ROOT).problems(b"not a zip") == ["the app bundle is not a zip archive"]
