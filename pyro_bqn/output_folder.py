"""The folder a command writes its results to, replaced as a whole or not at all.

A command's results (``metrics.json``, ``summary.md``, plots, the network) belong
together. So they are not written into the output folder ``<parent>/<name>`` one by one:
the run works in a *staging folder* beside it, ``<parent>/.<name>.partial`` (its checkpoint
lives there during training, so an interrupted run can be resumed), writes every result
there, and then **commits**: the staging folder takes the output folder's place in one
atomic step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, with the old
results kept in ``<parent>/.<name>.previous`` until the new ones are in place and put back
by the next run if the process died in between). Whatever interrupts a run, the output
folder holds the complete previous results or the complete new ones.

Policy, checked by :meth:`OutputFolder.prepare` before any work starts:

* a missing or empty output folder is used as it is;
* a folder with files in it is refused unless ``overwrite=True`` (the previous results are
  then replaced when the new ones are committed, not before);
* a staging folder left by an interrupted run is refused unless ``resume=True`` (continue
  it, after removing the temporary files of writes the interruption cut short) or
  ``overwrite=True`` (start over);
* a path that is a file, or whose parent cannot be written, is refused.

Usage::

    >>> import tempfile, pathlib
    >>> out = OutputFolder(pathlib.Path(tempfile.mkdtemp()) / "run")
    >>> out.prepare()
    >>> (out.staging / "metrics.json").write_text("{}")
    2
    >>> out.commit()
    >>> sorted(p.name for p in out.path.iterdir())
    ['metrics.json']
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

from pyro_bqn.atomic_files import fsync_folder

__all__ = ["OutputFolder", "OutputFolderError"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked; the message says what to do."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders' names in one atomic step; ``False`` where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    path, flags = ctypes.c_char_p, ctypes.c_uint
    renameat2.argtypes = [ctypes.c_int, path, ctypes.c_int, path, flags]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


class OutputFolder:
    """The results folder of one run (see the module docstring).

    :param path: the output folder the user named.
    :param overwrite: replace earlier results (and any interrupted run's staging folder).
    :param resume: continue the interrupted run in the staging folder.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self.staging = self.path.parent / f".{self.path.name}.partial"
        self.previous = self.path.parent / f".{self.path.name}.previous"

    def prepare(self) -> None:
        """Check the policy, recover from a commit that died half way, and create the
        staging folder.

        :raises OutputFolderError: naming the folder and the option that would allow it.
        """
        if self.path.name in ("", ".", ".."):
            raise OutputFolderError(f"--output must name a folder, got {str(self.path)!r}")
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"--output {self.path} is a file, not a folder")
        parent = self.path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputFolderError(
                    f"--output {self.path}: cannot create {parent}: {error.strerror}"
                ) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--output {self.path}: the folder {parent} is not writable")
        if self.path.exists() and not os.access(self.path, os.W_OK | os.X_OK):
            raise OutputFolderError(f"--output {self.path} is not writable")
        self._recover()
        if self.resume:
            if not self.staging.is_dir():
                raise OutputFolderError(
                    f"--resume: no interrupted run of {self.path} to resume "
                    f"({self.staging} does not exist)"
                )
            # A process killed in the middle of an atomic write leaves its temporary file.
            for temporary in self.staging.glob(".*.tmp"):
                temporary.unlink()
            return
        if self.staging.exists():
            if not self.overwrite:
                raise OutputFolderError(
                    f"--output {self.path}: an interrupted run is in {self.staging}; "
                    "continue it with --resume, or start over with --overwrite"
                )
            shutil.rmtree(self.staging)
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise OutputFolderError(
                f"--output {self.path} already holds results; choose another folder, or "
                "pass --overwrite to replace them (they are kept until the new ones are "
                "complete)"
            )
        self.staging.mkdir()

    def _recover(self) -> None:
        """Put back the previous results if a two-rename commit died between its renames."""
        if self.previous.exists():
            if self.path.exists():
                shutil.rmtree(self.previous)
            else:
                os.replace(self.previous, self.path)

    def commit(self) -> None:
        """Make the staging folder the output folder, in one atomic step where the system
        allows (see the module docstring), and remove the previous results."""
        fsync_folder(self.staging)
        if not self.path.exists():
            os.replace(self.staging, self.path)
        elif _exchange(self.staging, self.path):
            # The staging name now holds the previous results: rename them out of the way
            # first, so an interruption of the removal is not taken for a run to resume.
            os.replace(self.staging, self.previous)
            shutil.rmtree(self.previous)
        else:
            os.replace(self.path, self.previous)
            os.replace(self.staging, self.path)
            shutil.rmtree(self.previous)
        fsync_folder(self.path.parent)
