"""user_stacklevel: a warning raised inside library folders names the first frame outside."""

import os
import sys
import warnings

import pyro_bqn
from pyro_bqn.warning_location import LIBRARY_FOLDERS, user_stacklevel

# Code compiled under a file name inside pyro_bqn's folder counts as library code; the
# function calls itself `depth` times before warning, as a deep inference loop would.
_LIBRARY_SOURCE = """
def library_call(depth):
    if depth:
        return library_call(depth - 1)
    warnings.warn("from the library", UserWarning, stacklevel=user_stacklevel(sys._getframe()))
"""


def _library_function():
    namespace = {"warnings": warnings, "sys": sys, "user_stacklevel": user_stacklevel}
    filename = os.path.join(os.path.dirname(pyro_bqn.__file__), "_not_a_real_module.py")
    exec(compile(_LIBRARY_SOURCE, filename, "exec"), namespace)
    return namespace["library_call"]


def test_library_folders_are_pyro_bqn_pyro_and_torch():
    names = [os.path.basename(folder.rstrip(os.sep)) for folder in LIBRARY_FOLDERS]
    assert names == ["pyro_bqn", "pyro", "torch"]
    assert all(folder.endswith(os.sep) for folder in LIBRARY_FOLDERS)


def test_a_frame_of_user_code_names_itself():
    assert user_stacklevel(sys._getframe()) == 1


def test_a_warning_from_nested_library_frames_names_the_users_line():
    library_call = _library_function()
    for depth in (0, 3):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            line = sys._getframe().f_lineno + 1
            library_call(depth)
        assert [(w.filename, w.lineno) for w in record] == [(__file__, line)]
