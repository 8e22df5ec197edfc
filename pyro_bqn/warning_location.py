"""Where a warning raised deep inside pyro_bqn, Pyro or torch should point: the user's line.

``warnings.warn(..., stacklevel=2)`` names the caller of the warning function, which for a
warning raised inside an inference step is a line of Pyro or of this library. Python 3.12's
``skip_file_prefixes`` does this walk itself; this module does it on 3.11.
"""

from __future__ import annotations

import os
from types import FrameType

import pyro
import torch

__all__ = ["LIBRARY_FOLDERS", "user_stacklevel"]

#: The folders of pyro_bqn, Pyro and torch (each ending in the path separator).
LIBRARY_FOLDERS: tuple[str, ...] = tuple(
    os.path.dirname(path) + os.sep for path in (__file__, pyro.__file__, torch.__file__)
)


def user_stacklevel(frame: FrameType | None) -> int:
    """The ``stacklevel`` that makes a :func:`warnings.warn` called in ``frame`` name the
    first frame outside :data:`LIBRARY_FOLDERS`: the user's line, however deep in an
    inference loop the warning is raised.

    The caller passes its own frame (``sys._getframe()``) rather than this function finding
    it by depth, so that a wrapper around this function cannot shift the count.

    Example::

        >>> import sys, warnings
        >>> # in a pyro_bqn function, so that the warning names the user's line:
        >>> # warnings.warn(message, category, stacklevel=user_stacklevel(sys._getframe()))
        >>> user_stacklevel(sys._getframe())  # a frame of user code names itself
        1
    """
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_FOLDERS):
        frame, level = frame.f_back, level + 1
    return level
