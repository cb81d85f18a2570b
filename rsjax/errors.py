"""The exceptions a user can act on.

`UserError` and its subclasses carry a message that names the file, flag or
config key at fault and says what to do. The command line prints them as one
`error: ...` line and exits with status 2, without a traceback (`--verbose`
shows it); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import Optional


class UserError(ValueError):
    """A problem with what the user asked for or gave (arguments, files, configs)."""


class ConfigError(UserError):
    """An unknown config name, argument or key, or a value of the wrong type."""


class RunFailed(RuntimeError):
    """A run that started correctly and then could not go on (for example a
    diverged loss). The command line prints the message without a traceback
    and exits with status 1."""


DISK_FULL_MARKERS = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_full(err: BaseException) -> Optional[str]:
    """One line for an error caused by a full disk (or quota), whatever library raised it, else None.

    Libraries report it their own way: OSError ENOSPC/EDQUOT/EFBIG from Python,
    a RuntimeError whose text carries strerror from C++ writers (array_record,
    tensorstore), GDAL's own messages; the cause chain is searched too."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) \
                or any(marker in text for marker in DISK_FULL_MARKERS):
            where = getattr(err, "filename", None) or _path_in(text)
            where = _readable_path(str(where)) if where else None
            return (f"the disk is full (or over its quota){f' writing {where}' if where else ''}"
                    f"{space_note(where) if where else ''}. Free space there, or write elsewhere "
                    "(--data_dir, --workdir, --out).")
        err = err.__cause__ or err.__context__
    return None


def _path_in(text: str) -> Optional[str]:
    """The first absolute path a library's error text names as written to (quoted or not)."""
    import re

    match = re.search(r"(?:writing|open|to|file)\s*:?\s*[\"']?(/[^\s;:,\"']+)", text)
    return match.group(1) if match else None


def _readable_path(path: str) -> str:
    """A path as the user knows it: Orbax's temporary names dropped, a checkpoint's
    file cut at its step folder (<workdir>/checkpoints/2)."""
    import re

    path = re.sub(r"\.orbax-checkpoint-tmp[^/]*", "", path)
    match = re.match(r"(.*/checkpoints/\d+)(/|$)", path)
    return match.group(1) if match else path


def space_note(path: str) -> str:
    """'; 0.1 MiB free there, and a checkpoint of this run takes 1.9 MiB': what is free
    on the path's file system and, for a checkpoint, how much one needs."""
    import shutil
    from pathlib import Path

    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        note = f"; {_mib(shutil.disk_usage(existing).free)} free there"
    except OSError:
        return ""
    folder = Path(path).parent if Path(path).parent.name == "checkpoints" else None
    sizes = [_tree_size(step) for step in folder.iterdir()
             if step.name.isdigit() and step.is_dir()] if folder is not None and folder.is_dir() else []
    if sizes:
        note += f", and a checkpoint of this run takes {_mib(max(sizes))}"
    return note


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.1f} GiB"


def _tree_size(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
