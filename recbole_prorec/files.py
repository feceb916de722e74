"""Files written whole or not at all.

Caches, atomic data files, resume states and analysis ledgers are read back by later runs, some
after hours of training: a crash or an error mid-write must leave the previous file as it was,
never a truncated one that a later run would read as data.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_file(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file object on a temporary file beside ``path``, moved over ``path`` when the block ends
    without error and removed when it raises. Several of these entered together (an ``ExitStack``)
    replace their targets only after every one of them has been written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(fd, 0o644)  # mkstemp's 0600 would hide shared datasets and caches from other users
    text = {} if binary else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(fd, "wb" if binary else "w", **text) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
