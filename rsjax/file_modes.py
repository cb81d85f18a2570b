"""The permissions a new file or folder of this user gets (0o666 / 0o777 less the umask).

Files made by `tempfile` (mkstemp 0o600, mkdtemp 0o700) and then renamed into
place keep their owner-only mode; outputs a person shares (predicted GeoTIFFs,
their STAC items, report folders) get these modes instead, as if created
directly.
"""
from __future__ import annotations

import os


def current_umask() -> int:
    # Python 3.11 has no os.getumask(): set and restore it (this process
    # creates no other file in between).
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """0o666 less the umask: 0o644 under the usual umask 0o022."""
    return 0o666 & ~current_umask()


def new_dir_mode() -> int:
    """0o777 less the umask: 0o755 under the usual umask 0o022."""
    return 0o777 & ~current_umask()
