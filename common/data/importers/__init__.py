"""Importers: turn public datasets, in their publishers' layouts, into fedfuse site folders.

Each importer reads a source folder given as an argument, writes one site folder per natural
client under an output folder (atomically, with ``common.data.site_folders.write_site``) and returns the
paths it wrote. A source that is not in the expected layout raises ``DataError``.
"""

from __future__ import annotations

from common.data.importers.av_digits import import_av_digits
from common.data.importers.hapt import import_hapt

__all__ = ["import_av_digits", "import_hapt"]
