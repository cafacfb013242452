"""Every file a run writes, whole or not at all: written under a temporary name beside it, fsynced, renamed.

A reader (timm, the next resume, a teammate) never meets a truncated file: after a full disk, a crash or a kill
the path holds the old content or the new one, never part of either. A folder (the export) is written alike: filled
under a hidden sibling name and renamed into place, so it is complete or absent. The writers raise `OSError`
naming the path they were writing; `write_errors` turns it into one error line, saying what is intact, where the
caller knows that.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from absl import logging

from onepfrac_jax.config import RunError


def _hidden_sibling(path: Path, kind: str) -> Path:
    """`.NAME.KIND-XXXXXXXX` beside `path`: a name no other writer picks, out of `ls` and of an ImageFolder's view."""
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")


def _sync_folder(path: Path) -> None:
    """Makes the renames inside `path` durable."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the files themselves are synced
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: Path, data: bytes | str | Callable[[BinaryIO], object], durable: bool = True) -> None:
    """`data` at `path`, whole or not at all; a callable is given an in-memory file to save into (PIL, matplotlib,
    torch), so every write to the disk, and so every OSError, is this function's. The file gets the mode the umask
    gives (0644 under the usual 022: teammates on a shared filesystem read it; tempfile's would be 0600).
    `durable=False` skips the fsyncs, for trees of many small files whose writer syncs once at the end; the rename
    still keeps each file whole or absent. An OSError names `path`, and no temporary file is left."""
    path = Path(path)
    if callable(data):
        buffer = io.BytesIO()
        data(buffer)
        data = buffer.getvalue()
    tmp = _hidden_sibling(path, "tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    if durable:
        _sync_folder(path.parent)


def _swap_in(new: Path, path: Path) -> None:
    """Renames the folder `new` to `path`. An old `path` is first renamed aside (one rename within the parent), then
    removed: `path` holds the old folder or the new one, never a half-deleted one. If removing the old one fails, a
    warning says where it lies."""
    old = _hidden_sibling(path, "replaced") if os.path.lexists(path) else None
    if old is not None:
        os.rename(path, old)
    try:
        os.rename(new, path)
    except OSError:
        if old is not None:
            try:
                os.rename(old, path)
            except OSError:
                logging.warning("the old %s lies at %s (it could not be put back)", path, old)
        raise
    _sync_folder(path.parent)
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as e:
            logging.warning("the old %s was moved aside to %s, which could not be removed (%s: %s); remove it "
                            "yourself", path, old, e.filename, e.strerror)


def write_folder(path: Path, fill: Callable[[Path], Mapping[str, Path]]) -> dict[str, Path]:
    """`fill(folder)` writes a folder that appears at `path` complete or not at all: it is filled in a hidden sibling
    (as `.NAME.new-*/NAME`: fill sees the final name), then swapped in (`_swap_in`); returns fill's paths as they lie
    under `path`. On any failure the partial folder is removed; an OSError names the file as it would have been
    under `path`."""
    path = Path(path)
    staging = _hidden_sibling(path, "new")
    new = staging / path.name
    try:
        new.mkdir(parents=True)
        written = fill(new)
        _swap_in(new, path)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and Path(e.filename).is_relative_to(new):
            raise OSError(e.errno, e.strerror, str(path / Path(e.filename).relative_to(new))) from e
        raise
    staging.rmdir()
    return {name: path / Path(file).relative_to(new) for name, file in written.items()}


@contextlib.contextmanager
def write_errors(intact: str, error: type[Exception] = RunError) -> Iterator[None]:
    """An OSError inside (a full disk, a read-only filesystem) becomes one `error` line: the path, the reason, and
    `intact`, what the failure left as it was."""
    try:
        yield
    except OSError as e:
        raise error(f"cannot write {e.filename or 'a file'}: {e.strerror or e}; {intact}") from e
