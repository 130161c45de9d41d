"""Output paths for backend artifacts: checked before any work, staged, then moved into place.

A backend builds its artifacts in a hidden staging folder beside the destination, verifies
them there, and only then moves each one to its final name (``os.replace``, atomic on one
file system). A failure at any step removes the staging folder, so nothing half-written is
ever left under the destination.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mvcompile.errors import UserError

log = logging.getLogger(__name__)


def existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path.cwd()


def check_writable_dir(folder: Path, what: str) -> None:
    """Raise :class:`UserError` unless ``folder`` is, or can be created as, a writable folder."""
    folder = Path(folder)
    for parent in [folder, *folder.parents]:
        if parent.is_symlink() and not parent.exists():
            raise UserError(f"Cannot write the {what} to {folder}: {parent} is a symbolic "
                            "link to nothing. Remove it or choose another output path.")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"Cannot write the {what} to {folder}: {parent} is a file, "
                                "not a folder. Choose another output path.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"Cannot write the {what} to {folder}: {parent} is not "
                                "writable. Choose another output path.")
            return


@contextlib.contextmanager
def staging_dir(destination: Path, what: str) -> Iterator[Path]:
    """A hidden temporary folder on the same file system as ``destination``; always removed."""
    base = existing_ancestor(destination.parent)
    try:
        stage = Path(tempfile.mkdtemp(prefix=".mvcompile-stage-", dir=base))
    except OSError as err:
        raise UserError(f"Cannot write the {what} to {destination}: {err.strerror}.") from err
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_replaceable(staged: Path, destination: Path, what: str) -> None:
    """UserError if :func:`publish` could not put ``staged`` at ``destination`` (a folder is in
    the way of a file, or a file of a folder): called for every artifact before the first one
    is moved, so that nothing is written."""
    if destination.exists() and destination.is_dir() != staged.is_dir():
        found = "folder" if destination.is_dir() else "file"
        raise UserError(f"Cannot write the {what} to {destination}: a {found} of that name is in "
                        "the way. Nothing was written; move it or choose another output folder.")


def publish(staged: Path, destination: Path, what: str) -> Path:
    """Move a verified file or folder from staging to ``destination``, replacing it.

    A folder (an .mlpackage) cannot be renamed over a non-empty folder, so an existing one is
    first renamed aside and deleted only after the new one is in place.
    """
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.is_dir() and staged.is_dir():
            _replace_folder(staged, destination)
        else:
            os.replace(staged, destination)
    except OSError as err:
        raise UserError(f"Cannot write the {what} to {destination}: {err.strerror}.") from err
    log.info("wrote %s", destination)
    return destination


def _replace_folder(staged: Path, destination: Path) -> None:
    """Rename the folder ``destination`` aside, ``staged`` into its place, then delete the old
    one. On an error the old folder is put back and the empty aside folder removed (should
    putting it back fail too, it stays in the aside folder rather than being deleted)."""
    aside = Path(tempfile.mkdtemp(prefix=".mvcompile-old-", dir=destination.parent))
    try:
        os.replace(destination, aside / destination.name)
    except OSError:
        aside.rmdir()
        raise
    try:
        os.replace(staged, destination)
    except OSError:
        os.replace(aside / destination.name, destination)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
