"""Atomic folder saves, for both checkpoint formats (the plain one of ``folder.py``, the sharded one of
gpt2lab.train.dcp): everything is written into a hidden temporary folder beside the final one, which
``publish`` then gives its name in one rename::

    tmp = temp_dir(final)      # RUN/checkpoints/.tmp_step_0000100_XXXXXXXX
    ...                        # write every file, config.json last
    publish(tmp, final)        # RUN/checkpoints/step_0000100

Where the final folder exists already (the same step saved twice), ``publish`` moves it aside (into
``.old_XXXXXXXX/step_0000100``), renames the new one into place, then deletes the old one: at every moment the
step is on disk, whole, under its name or aside. ``recover`` undoes what a kill between those two renames
leaves: an aside copy whose name is free goes back to it (the old save: the new one never got its name).
Readers (``folder.checkpoint_dirs``) only move back; the writer, before a save of its own (when none runs),
also deletes the leftovers: aside copies whose name holds the newer folder, and killed saves' temporary folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp_"  # a save being written (or killed while written): never a checkpoint
ASIDE_PREFIX = ".old_"  # an old folder moved out of the way of its replacement, inside a folder of this prefix
ATTEMPTS = 3  # renames into place tried while a reader's recover moves the old folder back in between


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (no race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def temp_dir(final: str | Path) -> Path:
    """A new hidden folder beside final (``.tmp_<name>_XXXXXXXX``) to write into, with the umask's permissions
    (mkdtemp's are 0700; it becomes the checkpoint, which others on the machine may read)."""
    final = Path(final)
    folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}_", dir=final.parent))
    os.chmod(folder, 0o777 & ~umask())
    return folder


def publish(tmp: str | Path, final: str | Path) -> Path:
    """Give the complete folder tmp the name final; an existing final is replaced and never lost. Return final.

    The old final is moved aside, the new one renamed into place, then the old one deleted. Should the rename
    fail, the old one goes back under its name and the error is raised (tmp stays, for the caller to delete).
    """
    tmp, final = Path(tmp), Path(final)
    asides: list[Path] = []
    try:
        for attempt in range(ATTEMPTS):
            if final.exists():
                asides.append(Path(tempfile.mkdtemp(prefix=ASIDE_PREFIX, dir=final.parent)))
                os.rename(final, asides[-1] / final.name)
            try:
                os.rename(tmp, final)
                break
            except OSError:
                if attempt + 1 == ATTEMPTS or not final.exists():  # there again: a reader moved the old one back
                    raise
    except BaseException:
        for aside in asides:
            if not final.exists():
                with contextlib.suppress(OSError):
                    os.rename(aside / final.name, final)
            with contextlib.suppress(OSError):
                aside.rmdir()  # only if emptied
        raise
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:  # deleted meanwhile by the writer, or not a folder
        return []


def recover(root: str | Path, clean: bool = False) -> None:
    """Undo a publish killed between its two renames in root: an aside copy whose name is free goes back to it.

    With ``clean`` (the writer, before it saves: no publish runs in root then) also delete what is left over:
    aside copies whose name holds the newer folder, and the temporary folders of killed saves.
    """
    root = Path(root)
    for aside in sorted(root.glob(ASIDE_PREFIX + "*")):
        for old in _entries(aside):
            if not (root / old.name).exists():
                with contextlib.suppress(OSError):  # another process moved it back first, or root is read-only
                    os.rename(old, root / old.name)
        if clean and all((root / old.name).exists() for old in _entries(aside)):
            shutil.rmtree(aside, ignore_errors=True)
    if clean:
        for tmp in root.glob(TEMP_PREFIX + "*"):
            shutil.rmtree(tmp, ignore_errors=True)
