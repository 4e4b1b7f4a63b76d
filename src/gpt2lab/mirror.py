"""The offline data mirror: one folder laid out like ../shared/data, named by ``--mirror`` or ``$GPT2LAB_MIRROR``.

Every module that reads from the mirror (the tokenizer, the data sources, the evaluations) asks
``mirror_dir`` for it, so a wrong value gives the same message everywhere: the value as given
and the absolute folder it was resolved to (a relative value is resolved against the working
directory of the command, which is the usual surprise).
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2lab.errors import Gpt2LabError

ENV = "GPT2LAB_MIRROR"


def mirror_dir(explicit: str | Path | None = None) -> Path | None:
    """The mirror folder as an absolute path: ``explicit`` (--mirror), else $GPT2LAB_MIRROR, else None."""
    value = explicit or os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    resolved = path.resolve()
    if not resolved.is_dir():
        what = f"--mirror is {value}" if explicit else f"{ENV} is set to {value}"
        raise Gpt2LabError(
            f"{what} (resolved to {resolved}), which does not exist; "
            "give the data mirror folder as an absolute path (e.g. /path/to/shared/data)"
        )
    return resolved


def mirror_file(relative: str, explicit: str | Path | None = None) -> Path | None:
    """``MIRROR/relative`` when the mirror is set and holds that file, else None."""
    root = mirror_dir(explicit)
    if root is not None and (root / relative).is_file():
        return root / relative
    return None
