"""Checked payload files: the on-disk envelope shared by training checkpoints
(:mod:`pyro_bqn.checkpoint`) and exported networks (:mod:`pyro_bqn.export`).

A payload file is ``torch.save`` of a plain dictionary, written atomically
(:func:`pyro_bqn.atomic_files.torch_save`: an interrupted save leaves the previous file) and
read back with ``torch.load(..., weights_only=True)``, so loading runs no code from the
file::

    {
        "format": str,                # what the file is, e.g. "pyro_bqn.checkpoint"
        "version": int,               # the layout of the entries below, per format
        ...,                          # the format's entries
        "checksum": "sha256:<64 hex digits>",   # always the last entry
    }

**Why a checksum.** Torch files do not check their content: flipped bytes in a tensor
record, or in the pickled structure, load silently with changed values (a checkpoint with
200 flipped bytes halved a network's accuracy). The checksum is a SHA-256 of the *content*,
not of the file's bytes, so that any change to a value is detected while the same content
written again (another zip layout, another torch version) still matches.

**The checksum rule.** SHA-256 over the encoding of the dictionary without its
``"checksum"`` entry, where a value is encoded as a one-byte tag and a body, every length
and count an unsigned 64-bit little-endian integer (``n``)::

    None         b"N"
    bool         b"B" + (b"\\x01" if value else b"\\x00")
    int          b"I" + n + ASCII lower-case hexadecimal digits, "-" first if negative
    float        b"F" + IEEE 754 binary64, little-endian
    str          b"S" + n + UTF-8 bytes
    list         b"L" + n + each item
    tuple        b"T" + n + each item (also torch.Size)
    dict         b"D" + n + key, value of each entry in stored order (keys: None, bool,
                 int, float or str)
    tensor       b"X" + str(dtype) encoded as a str + the shape encoded as a tuple of ints
                 + n + the elements' bytes in row-major order (native byte order, little
                 endian on every platform PyTorch supports)

Nothing else can be stored (no code, no arbitrary objects), and nesting is limited to
:data:`MAX_DEPTH` levels. The encoding is unambiguous, so two payloads have the same
checksum only if they hold the same keys in the same order and values of the same types
that are equal bit for bit (``-0.0`` differs from ``0.0``, ``(1, 2)`` from ``[1, 2]``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from pyro_bqn.atomic_files import PathLike, torch_save

__all__ = [
    "CHECKSUM_KEY",
    "MAX_DEPTH",
    "check_storable",
    "load_payload",
    "payload_checksum",
    "save_payload",
]

CHECKSUM_KEY = "checksum"
CHECKSUM_PREFIX = "sha256:"
# Deep enough for any state a payload holds (optimiser states nest 5 levels), and a guard
# against a damaged file whose pickle refers to itself.
MAX_DEPTH = 64

_STORABLE = "None, bool, int, float, str, list, tuple, dict and tensors"


class _Unstorable(Exception):
    """A value the checksum rule cannot encode, at ``where``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where} {reason}")


def _count(n: int) -> bytes:
    return struct.pack("<Q", n)


def _encoded(value: Any, where: str, depth: int = 0) -> Iterator[bytes | memoryview]:
    """The byte chunks of ``value`` under the checksum rule (module docstring).

    :param where: how to name ``value`` in an error, e.g. ``"extra['history'][3]"``.
    :raises _Unstorable: naming the first value that is not storable.
    """
    if depth > MAX_DEPTH:
        raise _Unstorable(where, f"is nested more than {MAX_DEPTH} levels deep")
    if value is None:
        yield b"N"
    elif isinstance(value, bool):
        yield b"B\x01" if value else b"B\x00"
    elif isinstance(value, int):
        # Hexadecimal: Python limits decimal conversion of huge ints, a damaged file may hold one.
        digits = format(value, "x").encode("ascii")
        yield b"I" + _count(len(digits)) + digits
    elif isinstance(value, float):
        yield b"F" + struct.pack("<d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        yield b"S" + _count(len(data)) + data
    elif isinstance(value, torch.Tensor):
        yield from _encoded_tensor(value, where)
    elif isinstance(value, list | tuple):
        yield (b"L" if isinstance(value, list) else b"T") + _count(len(value))
        for index, item in enumerate(value):
            yield from _encoded(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, dict):
        yield b"D" + _count(len(value))
        for key, item in value.items():
            if not (key is None or isinstance(key, int | float | str)):
                raise _Unstorable(
                    where,
                    f"has a key of type {type(key).__qualname__}; keys must be "
                    "None, bool, int, float or str",
                )
            yield from _encoded(key, where, depth + 1)
            yield from _encoded(item, f"{where}[{key!r}]", depth + 1)
    else:
        raise _Unstorable(
            where, f"is of type {type(value).__qualname__}; a payload file stores only {_STORABLE}"
        )


def _encoded_tensor(tensor: torch.Tensor, where: str) -> Iterator[bytes | memoryview]:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise _Unstorable(
            where,
            f"is a {tensor.layout} tensor on {tensor.device}; a payload file stores "
            "dense tensors only",
        )
    try:
        flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy()
    except (RuntimeError, TypeError) as error:  # e.g. a dtype whose bytes cannot be viewed
        reason = f"is a {tensor.dtype} tensor whose bytes cannot be read: {error}"
        raise _Unstorable(where, reason) from error
    yield b"X"
    yield from _encoded(str(tensor.dtype), where)
    yield from _encoded(tuple(tensor.shape), where)
    yield _count(data.nbytes)
    yield memoryview(data)


def check_storable(value: Any, name: str) -> None:
    """Refuse ``value`` unless a payload file can store it and read it back exactly: plain
    containers (dict with None/bool/int/float/str keys, list, tuple) of None, bool, int,
    float, str and dense tensors.

    :param name: how to name ``value`` in the error, e.g. ``"extra"``.
    :raises ValueError: naming the first part that cannot be stored, e.g.
        ``extra['fit']['callback'] is of type Foo``.
    """
    try:
        for _ in _encoded(value, name):
            pass
    except _Unstorable as error:
        raise ValueError(str(error)) from None


def payload_checksum(payload: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of ``payload`` without its ``"checksum"`` entry (rule in the
    module docstring).

    :raises ValueError: naming the first entry that cannot be stored.
    """
    content = {key: value for key, value in payload.items() if key != CHECKSUM_KEY}
    digest = hashlib.sha256()
    try:
        for chunk in _encoded(content, "payload"):
            digest.update(chunk)
    except _Unstorable as error:
        raise ValueError(str(error)) from None
    return CHECKSUM_PREFIX + digest.hexdigest()


def save_payload(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` and its checksum to ``path`` atomically: an interrupted save
    leaves the previous file (if any) as it was.

    :param payload: ``{"format": str, "version": int, ...}`` without a ``"checksum"``
        entry; storable values only (see :func:`check_storable`).
    :raises ValueError: if ``payload`` lacks its format or version, already holds a
        checksum, or holds something that cannot be stored (named); nothing is written.
    """
    if not isinstance(payload.get("format"), str) or type(payload.get("version")) is not int:
        raise ValueError(
            "payload must hold a str 'format' and an int 'version', got "
            f"{payload.get('format')!r} and {payload.get('version')!r}"
        )
    if CHECKSUM_KEY in payload:
        raise ValueError(f"payload must not hold a {CHECKSUM_KEY!r} entry; save_payload adds it")
    checksum = payload_checksum(payload)
    torch_save({**payload, CHECKSUM_KEY: checksum}, path)


def load_payload(
    path: PathLike,
    file_format: str,
    version: int,
    tensor_groups: tuple[str, ...] = (),
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read a file written by :func:`save_payload` of ``{"format": file_format, "version":
    version, ...}``, check it, and return its content without the checksum.

    The checks, in order: the file is a weights-only torch file holding a dictionary of
    ``file_format``; its checksum matches its content (when it has one); it is ``version``
    (an older version has no checksum and another layout); each ``tensor_groups`` entry is a
    dictionary of named tensors.

    :param tensor_groups: keys whose entries must be ``{name: tensor}`` dictionaries.
    :param map_location: the device the tensors are loaded onto (``torch.load``'s), whatever
        device they were saved from; the checksum does not depend on it.
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: naming ``path`` for every other reason it cannot be read: not a file
        (e.g. a folder) or unreadable, not a ``file_format`` file, corrupt (damaged bytes,
        truncated), another version.
    """
    name = repr(os.fspath(path))
    try:
        handle = open(path, "rb")  # closed by the with block below
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{name} cannot be read as a {file_format} file: {error}") from error
    with handle:
        try:
            payload = torch.load(handle, map_location=map_location, weights_only=True)
        except Exception as error:  # torch.load's many ways of rejecting damaged bytes
            raise ValueError(
                f"{name} is not a {file_format} file, or is corrupt: it cannot be read as a "
                f"weights-only torch file ({type(error).__name__}: {error})"
            ) from error
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != file_format:
        raise ValueError(f"{name} is not a {file_format} file (format entry: {found!r})")
    if CHECKSUM_KEY in payload:
        _verify(payload, name)
    found_version = payload.get("version")
    if found_version == version and CHECKSUM_KEY not in payload:
        raise ValueError(
            f"{name} is damaged: it has no checksum entry, which version {version} of "
            f"{file_format} always holds"
        )
    if found_version != version:
        if type(found_version) is int and found_version < version:
            written_by = "an older pyro_bqn, before files carried a checksum"
        elif type(found_version) is int:
            written_by = "a newer pyro_bqn"
        else:
            written_by = "no pyro_bqn"
        raise ValueError(
            f"{name} is version {found_version!r} of {file_format}, written by {written_by}; "
            f"this pyro_bqn reads version {version} only (re-create the file with it)"
        )
    del payload[CHECKSUM_KEY]
    for group in tensor_groups:
        entries = payload.get(group)
        if not isinstance(entries, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in entries.items()
        ):
            raise ValueError(
                f"{name} is a damaged {file_format} file: its {group!r} entry is not a "
                "dictionary of named tensors"
            )
    return payload


def _verify(payload: dict[str, Any], name: str) -> None:
    """Refuse ``payload`` (read from the file ``name``) unless its checksum matches."""
    stored = payload[CHECKSUM_KEY]
    try:
        actual = payload_checksum(payload)
    except ValueError as error:  # only a damaged pickle yields other objects
        raise ValueError(f"{name} is corrupt: {error}") from None
    if stored != actual:
        raise ValueError(
            f"{name} is corrupt: its checksum does not match its content (stored "
            f"{str(stored)[:30]!r}..., content {actual[:30]!r}...); restore it from a copy"
        )
