"""Writing files so that they are never half-written, mixed up or redirected.

Every file the project writes (models, plans, CSVs, reports, plots, records) goes through
`write_atomic`: the content goes to a fresh temporary file in the target folder, created
exclusively (a unique name, never an existing file or a planted link), flushed to disk, then
renamed onto the target in one step. A reader sees the old file or the whole new one; two
writers to one path each land whole (the last rename wins, or with `replace=False` the
second is refused), and a link at the target is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from amg.errors import InputError


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], replace: bool = True) -> Path:
    """Call `write(stream)` into a temporary file beside `path`, then move it to `path`.

    `replace=False` never overwrites: an existing `path` raises FileExistsError (for run
    reports, where a second writer must not take the first one's name).
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path} is a folder: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results and models are meant to be shared
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails when the name is taken
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, replace: bool = True) -> Path:
    """`write_atomic` for UTF-8 text (JSON, CSV, Markdown)."""
    return write_atomic(path, lambda stream: stream.write(text.encode("utf-8")), replace=replace)


def write_png_atomic(figure, path: str | Path, dpi: int = 120) -> Path:
    """`write_atomic` for a matplotlib figure, as PNG (every plot and picture of the report)."""
    return write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=dpi))


@contextlib.contextmanager
def writing_together(path: str | Path) -> Iterator[None]:
    """Hold `path`'s lock (flock on `.<name>.lock` beside it) while several files that belong
    together are written (a model and its plan): two writers each land their whole pair, one
    after the other, never one's model with the other's plan. The lock dies with the process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield
