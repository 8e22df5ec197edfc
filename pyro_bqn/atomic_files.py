"""Files written atomically: a reader (or a crash) sees the old file or the complete new
one, never a part.

Each write goes to a fresh temporary file in the destination's folder, is flushed to disk
with ``fsync``, and then renamed over the destination with :func:`os.replace` (atomic on
POSIX file systems when both names are in one folder); the folder is fsynced too, so the
rename itself survives a power cut. An interrupted write leaves at most a hidden
``.<name>.*.tmp`` file beside the destination and the destination untouched.

Usage::

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_text(folder / "notes.txt", "hello\\n")
    >>> (folder / "notes.txt").read_text()
    'hello\\n'
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_writer", "fsync_folder", "torch_save", "write_bytes", "write_text", "write_with"]

PathLike = str | os.PathLike


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(descriptor)


@contextmanager
def atomic_writer(path: PathLike, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` when the ``with`` block ends
    without an exception (and is discarded otherwise).

    :param mode: permission bits of the new file, set with ``chmod`` (a temporary file
        starts private, ``0o600``).
    :raises OSError: as raised by the file system (e.g. the folder does not exist or is
        not writable); ``path`` is then unchanged.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: never leave the partial file behind
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_folder(path.parent)


def write_bytes(path: PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` atomically with ``data``."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_text(path: PathLike, text: str) -> None:
    """Replace ``path`` atomically with ``text`` encoded as UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    with atomic_writer(path) as handle:
        torch.save(obj, handle)


def write_with(path: PathLike, writer: Callable[[io.BufferedIOBase], Any]) -> None:
    """Replace ``path`` atomically with whatever ``writer(file_object)`` writes (e.g. a
    figure's ``savefig``)."""
    with atomic_writer(path) as handle:
        writer(handle)
