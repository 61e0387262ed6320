"""Which app code a site runs: only the fedfuse it installed and reviewed, never code the operator pushes unchecked.

In a deployment the ClientApp's code comes from the run's app bundle (FAB), which the server operator
builds and sends. A malicious operator could ship a ClientApp that uploads records. A site therefore
checks every FAB before Flower installs it (``client/executor.py``) against the fedfuse installed at
the site (a source checkout: ``pip install -e .`` or ``make install``):

- every Python file in the FAB must be byte-for-byte the file at the same path in the site's checkout
  (a file the checkout lacks is refused too: it could shadow a library);
- its ``[tool.flwr.app.components]`` must name the same ClientApp and ServerApp;
- every other file must be data Flower itself bundles (``.toml .md .yaml .yml .json .jsonl``, LICENSE):
  anything else (``.so``, ``.pth``, ``.pyc``, ...) is refused.

Files of the checkout that the FAB lacks do not matter: a missing module fails to import, it cannot
bring in other code. A refused app never reaches the site's data: the task fails before Flower unpacks it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import ConfigError, FedfuseError

UNTRUSTED_APP_MARK = "fedfuse-untrusted-app"  # in the error text a refused task sends: results.json says app-refused
DATA_SUFFIXES = (".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
FAB_MANIFEST = ".info/CONTENT"  # Flower's own manifest of the FAB's files and hashes
MAX_SHOWN = 5  # differing files named in a refusal


class UntrustedAppError(FedfuseError):
    """A run's app bundle holds code that is not the fedfuse installed at this site."""


def _components(pyproject: bytes) -> Any:
    return tomllib.loads(pyproject.decode("utf-8")).get("tool", {}).get("flwr", {}).get("app", {}).get("components")


def installed_root() -> Path:
    """The source checkout fedfuse runs from here (the folder holding ``client/`` and ``pyproject.toml``)."""
    spec = importlib.util.find_spec("client")
    locations = list(spec.submodule_search_locations or []) if spec else []
    root = Path(locations[0]).resolve().parent if locations else None
    if root is None or not (root / "pyproject.toml").is_file() or not (root / "client" / "client_app.py").is_file():
        raise ConfigError(
            "a site checks each run's app against the fedfuse it has installed, which must be a source checkout "
            f"(found {root}): install fedfuse with `pip install -e .` (or `make install`) from the reviewed checkout"
        )
    return root


@dataclass(frozen=True)
class ReviewedApp:
    """The app code a site accepts: the fedfuse checkout at ``root``."""

    root: Path

    @classmethod
    def installed(cls) -> ReviewedApp:
        return cls(installed_root())

    def problems(self, fab: bytes) -> list[str]:
        """Why the FAB is not this checkout's app (empty: it is)."""
        try:
            archive = zipfile.ZipFile(io.BytesIO(fab))
        except zipfile.BadZipFile:
            return ["the app bundle is not a zip archive"]
        out: list[str] = []
        with archive:
            for info in archive.infolist():
                name = info.filename
                if name.endswith("/") or name == FAB_MANIFEST:
                    continue
                path = PurePosixPath(name)
                if path.is_absolute() or ".." in path.parts:
                    out.append(f"{name}: a path outside the app")
                    continue
                data = archive.read(info)
                if path.suffix == ".py":
                    local = self.root.joinpath(*path.parts)
                    if not local.is_file():
                        out.append(f"{name}: code this site does not have")
                    elif hashlib.sha256(local.read_bytes()).digest() != hashlib.sha256(data).digest():
                        out.append(f"{name}: differs from this site's copy")
                elif name == "pyproject.toml":
                    try:
                        theirs = _components(data)
                    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
                        theirs = None
                    if theirs != _components((self.root / "pyproject.toml").read_bytes()):
                        out.append("pyproject.toml: [tool.flwr.app.components] names other apps")
                elif not (path.suffix in DATA_SUFFIXES or name == "LICENSE"):
                    out.append(f"{name}: not a file type a fedfuse app holds")
        return out

    def check(self, fab: bytes) -> None:
        """Raise UntrustedAppError unless the FAB's code is this checkout's."""
        problems = self.problems(fab)
        if problems:
            shown = "; ".join(problems[:MAX_SHOWN]) + (
                f"; and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
            )
            raise UntrustedAppError(
                f"{UNTRUSTED_APP_MARK}: this site runs only the fedfuse app it has installed and reviewed, and the "
                f"run's app differs ({shown}). Run the app from the same fedfuse version the sites installed, or "
                "ask the sites to review and install yours"
            )
