"""Where an export is written: a new path, filled under a temporary name beside
it and renamed into place only once complete, so an interrupted or failed
export never leaves something that looks finished."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qckpt.errors import AlreadyExistsError, InvalidInputError


def local_path(dest: str | os.PathLike[str]) -> Path:
    """``dest`` as a local path; a URI (``s3://...``), which ``Path`` would quietly
    turn into a local directory named after the scheme, is an ``InvalidInputError``."""
    text = os.fspath(dest)
    if isinstance(text, str) and "://" in text:
        raise InvalidInputError(f"exports are written to a local path, not {text!r} (export locally, then copy it)")
    return Path(text)


@contextmanager
def new_destination(dest: Path, kind: str) -> Iterator[Path]:
    """A temporary path beside ``dest`` (not created) for the block to write a file
    or directory to; renamed to ``dest`` when the block completes, removed if it
    raises. ``dest`` must not exist (``AlreadyExistsError``, naming ``kind``:
    "file name", "directory"); missing parent directories are created, and a
    parent that is not a directory is an ``InvalidInputError``."""
    if dest.exists():
        raise AlreadyExistsError(f"{dest} exists already; choose a new {kind}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise InvalidInputError(f"cannot export to {dest}: {e.filename or dest.parent} is not a directory") from e
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.qckpt-tmp")  # unique: concurrent exports never meet
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
