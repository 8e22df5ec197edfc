"""Checkpoints and exported networks on disk (issue 13): written atomically, and read back
exactly or refused with a ValueError naming the file, never loaded with changed values."""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bqn.checkpoint import load_checkpoint, save_checkpoint
from pyro_bqn.export import QuantizedNetwork, export_network
from pyro_bqn.infer import AutoQuantizedGuide
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.payload_files import save_payload
from tests.trained_mlp import trained_mlp

SIZES = (4, 3, 2)  # small files: each fuzzed example loads one


def _same(saved: Any, loaded: Any, where: str = "content") -> None:
    """Assert that ``loaded`` is exactly ``saved``: same types, same dictionary entries, the
    same tensors bit for bit (dtype, shape and bytes)."""
    assert type(loaded) is type(saved), f"{where}: {type(loaded)} is not {type(saved)}"
    if isinstance(saved, dict):
        assert loaded.keys() == saved.keys(), where
        for key, value in saved.items():
            _same(value, loaded[key], f"{where}[{key!r}]")
    elif isinstance(saved, list | tuple):
        assert len(loaded) == len(saved), where
        for index, (first, second) in enumerate(zip(saved, loaded, strict=True)):
            _same(first, second, f"{where}[{index}]")
    elif isinstance(saved, torch.Tensor):
        assert (loaded.dtype, loaded.shape) == (saved.dtype, saved.shape), where
        bits = (saved.reshape(-1).view(torch.uint8), loaded.reshape(-1).view(torch.uint8))
        assert torch.equal(*bits), where
    elif isinstance(saved, float):
        assert struct.pack("<d", loaded) == struct.pack("<d", saved), where
    else:
        assert loaded == saved, where


@dataclass
class SavedFile:
    """A file written by the library, with how to load it through the public API and the
    content that loading it must give back."""

    kind: str
    path: Path
    load: Callable[[Path], Any]
    expected: Any


def _param_store_state() -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in pyro.get_param_store().get_state()["params"].items()}


def _saved_checkpoint(folder: Path) -> SavedFile:
    run = trained_mlp(sizes=SIZES, steps=2, n=8)
    extra = {
        "epoch": 2,
        "generator": torch.Generator().manual_seed(3).get_state(),
        "history": [{"epoch": 1, "loss": 1.25}, {"epoch": 2, "loss": -0.0}],
        "settings": {"lr": 0.1, "name": "run", "resume": True, "limit": None},
        "pair": (1, 2.5),
    }
    path = folder / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide, run.optimizer, extra=extra)
    expected = {
        "params": _param_store_state(),
        "buffers": {n: b.clone() for n, b in run.model.named_buffers()},
        "extra": extra,
    }
    pyro.clear_param_store()
    pyro.set_rng_seed(11)  # another initialisation than the saved run's
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)

    def load(file: Path) -> dict[str, Any]:
        extra = load_checkpoint(file, model, guide, run.x, run.y)
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return {"params": _param_store_state(), "buffers": buffers, "extra": extra}

    return SavedFile("checkpoint", path, load, expected)


def _network_content(network: QuantizedNetwork) -> dict[str, Any]:
    quantized = {
        name: {"packed": site.packed, "levels": site.levels, "shape": tuple(site.shape)}
        for name, site in network.quantized.items()
    }
    groups = {group: getattr(network, group) for group in ("continuous", "params", "buffers")}
    return {"quantized": quantized, **groups, "batch_norm": network.batch_norm}


def _saved_network(folder: Path) -> SavedFile:
    run = trained_mlp(sizes=SIZES, steps=2, n=8)
    network = export_network(run.model, run.guide, run.x, batch_norm_data=run.x)
    path = folder / "network.pt"
    network.save(path)
    return SavedFile(
        "network",
        path,
        lambda file: _network_content(QuantizedNetwork.load(file)),
        _network_content(network),
    )


SAVERS = {"checkpoint": _saved_checkpoint, "network": _saved_network}


@pytest.fixture(params=sorted(SAVERS))
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> SavedFile:
    return SAVERS[request.param](tmp_path)


def _refused(saved: SavedFile, data: bytes, match: str | None = None) -> str:
    """Write ``data`` as a file, load it, and return the ValueError's message, which must
    name the file."""
    path = saved.path.with_name(f"damaged-{saved.path.name}")
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as error:
        saved.load(path)
    assert str(path) in str(error.value)
    return str(error.value)


def _fresh_model_and_guide() -> tuple[QuantizedMLP, AutoQuantizedGuide]:
    pyro.set_rng_seed(5)
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)
    guide(torch.randn(2, SIZES[0]))  # creates the guide's parameters
    return model, guide


# --- writing ---------------------------------------------------------------------------------


def test_a_save_interrupted_midway_leaves_the_previous_file_intact(saved, monkeypatch):
    before = saved.path.read_bytes()

    def interrupted(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(file, str | os.PathLike):
            with open(file, "wb") as handle:
                handle.write(before[:100])
        else:
            file.write(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if saved.kind == "checkpoint":
            save_checkpoint(saved.path, *_fresh_model_and_guide(), extra={"epoch": 3})
        else:
            QuantizedNetwork.load(saved.path).save(saved.path)
    monkeypatch.undo()
    assert saved.path.read_bytes() == before
    assert [p.name for p in saved.path.parent.iterdir()] == [saved.path.name]  # no leftovers
    _same(saved.expected, saved.load(saved.path))


# --- reading damaged files -------------------------------------------------------------------


def test_a_saved_file_loads_exactly(saved):
    _same(saved.expected, saved.load(saved.path))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused_naming_it(saved, fraction):
    data = saved.path.read_bytes()
    _refused(saved, data[: int(len(data) * fraction)])


def test_a_missing_file_or_a_folder_is_refused_naming_it(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        saved.load(tmp_path / "missing.pt")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    with pytest.raises(ValueError, match="folder.pt"):
        saved.load(folder)


def _records(data: bytes) -> dict[str, tuple[int, int]]:
    """``{record name: (start, end)}`` of the stored bytes of each record of a torch file
    (a zip archive with uncompressed records)."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_length + extra_length
            spans[info.filename.split("/", 1)[1]] = (start, start + info.compress_size)
    return spans


def test_a_flipped_bit_in_a_stored_tensor_is_refused_as_corrupt(saved):
    data = bytearray(saved.path.read_bytes())
    start, end = next(span for name, span in _records(data).items() if name.startswith("data/"))
    data[(start + end) // 2] ^= 0x10
    message = _refused(saved, bytes(data), match="corrupt")
    assert "checksum" in message


def _raw(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _first(entries: dict[str, Any]) -> Any:
    return next(iter(entries.values()))


# Edits of a saved payload that keep its (now stale) checksum: each must be refused.
CHECKPOINT_EDITS = {
    "a parameter's value": lambda p: _first(p["params"]).view(-1)[0].add_(1e-7),
    "a buffer's dtype": lambda p: p["model_buffers"].update(
        {"body.2.running_mean": p["model_buffers"]["body.2.running_mean"].double()}
    ),
    "an optimiser setting": lambda p: _first(p["optimizer"])["param_groups"][0].update(lr=0.5),
    "an int": lambda p: p["extra"].update(epoch=3),
    "a float's sign": lambda p: p["extra"]["history"][1].update(loss=0.0),
    "a string": lambda p: p["extra"]["settings"].update(name="rum"),
    "a bool": lambda p: p["extra"]["settings"].update(resume=False),
    "None to 0": lambda p: p["extra"]["settings"].update(limit=0),
    "a tuple to a list": lambda p: p["extra"].update(pair=[1, 2.5]),
    "a dropped list entry": lambda p: p["extra"]["history"].pop(),
    "a renamed key": lambda p: p["extra"].update(epochs=p["extra"].pop("epoch")),
    "the version": lambda p: p.update(version=7),
}
NETWORK_EDITS = {
    "a packed byte": lambda p: _first(p["quantized"])["packed"][0].add_(1),
    "a level value": lambda p: _first(p["quantized"])["levels"][0].sub_(1),
    "a shape": lambda p: _first(p["quantized"])["shape"].reverse(),
    "a continuous site": lambda p: _first(p["continuous"]).mul_(2),
    "an int buffer": lambda p: p["buffers"]["body.2.num_batches_tracked"].add_(1),
    "the batch-norm source": lambda p: p.update(batch_norm="model"),
}
EDITS = [("checkpoint", name) for name in CHECKPOINT_EDITS] + [
    ("network", name) for name in NETWORK_EDITS
]


@pytest.mark.parametrize(("kind", "edit"), EDITS)
def test_an_edited_entry_with_a_stale_checksum_is_refused_as_corrupt(tmp_path, kind, edit):
    saved = SAVERS[kind](tmp_path)
    payload = _raw(saved.path)
    {**CHECKPOINT_EDITS, **NETWORK_EDITS}[edit](payload)
    damaged = tmp_path / "damaged.pt"
    torch.save(payload, damaged)
    with pytest.raises(ValueError, match=re.escape(f"'{damaged}' is corrupt")):
        saved.load(damaged)


def test_the_checksum_covers_the_content_not_the_bytes(saved, tmp_path):
    # The same content written again (other bytes: another archive name inside the zip)
    # loads exactly.
    resaved = tmp_path / "resaved.pt"
    torch.save(_raw(saved.path), resaved)
    assert resaved.read_bytes() != saved.path.read_bytes()
    _same(saved.expected, saved.load(resaved))


def test_old_and_unchecked_versions_are_refused_with_a_clear_error(saved, tmp_path):
    payload = _raw(saved.path)
    del payload["checksum"]
    unchecked = tmp_path / "unchecked.pt"
    torch.save(payload, unchecked)
    with pytest.raises(ValueError, match=r"unchecked\.pt' is damaged: it has no checksum"):
        saved.load(unchecked)

    old = tmp_path / "old.pt"
    torch.save({**payload, "version": 1}, old)
    with pytest.raises(ValueError, match=r"old\.pt' is version 1 .*older pyro_bqn.* version 2"):
        saved.load(old)

    newer = tmp_path / "newer.pt"
    save_payload(newer, {**payload, "version": 3})
    with pytest.raises(ValueError, match=r"newer\.pt' is version 3 .* newer pyro_bqn"):
        saved.load(newer)


# --- fuzzing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """Damage to a file's bytes. ``region`` picks the bytes that positions (fractions in
    ``[0, 1)``) fall in: the whole file, the pickled structure or the tensor data."""

    kind: str  # "flip" (bits), "overwrite" (bytes), "truncate", "append"
    region: str
    positions: tuple[float, ...]
    bits: tuple[int, ...] = ()
    data: bytes = b""

    def apply(self, original: bytes) -> bytes:
        if self.kind == "truncate":
            return original[: int(len(original) * self.positions[0])]
        if self.kind == "append":
            return original + self.data
        start, end = _regions(original)[self.region]
        damaged = bytearray(original)
        offsets = [start + int((end - start) * position) for position in self.positions]
        if self.kind == "flip":
            for offset, bit in zip(offsets, self.bits, strict=True):
                damaged[offset] ^= 1 << bit
        else:
            damaged[offsets[0] : offsets[0] + len(self.data)] = self.data
        return bytes(damaged[: len(original)] if self.kind == "overwrite" else damaged)


def _regions(data: bytes) -> dict[str, tuple[int, int]]:
    records = _records(data)
    tensors = [span for name, span in records.items() if name.startswith("data/")]
    return {
        "file": (0, len(data)),
        "pickle": records["data.pkl"],
        "tensors": (min(s for s, _ in tensors), max(e for _, e in tensors)),
    }


_fractions = st.floats(0.0, 1.0, exclude_max=True)
_regions_st = st.sampled_from(["file", "pickle", "tensors"])


@st.composite
def corruptions(draw: st.DrawFn) -> Corruption:
    kind = draw(st.sampled_from(["flip", "flip", "overwrite", "truncate", "append"]))
    if kind == "flip":
        count = draw(st.integers(1, 4))
        positions = tuple(draw(_fractions) for _ in range(count))
        bits = tuple(draw(st.integers(0, 7)) for _ in range(count))
        return Corruption(kind, draw(_regions_st), positions, bits)
    if kind == "overwrite":
        data = draw(st.binary(min_size=1, max_size=16))
        return Corruption(kind, draw(_regions_st), (draw(_fractions),), data=data)
    if kind == "truncate":
        return Corruption(kind, "file", (draw(_fractions),))
    return Corruption(kind, "file", (), data=draw(st.binary(min_size=1, max_size=64)))


@pytest.mark.parametrize("kind", sorted(SAVERS))
# A flipped byte can turn the pickle's protocol number into one torch warns about.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_damaged_bytes_are_refused_naming_the_file_or_load_exactly(tmp_path, kind):
    saved = SAVERS[kind](tmp_path)
    original = saved.path.read_bytes()
    damaged_path = tmp_path / f"damaged-{saved.path.name}"

    @settings(
        max_examples=200,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(corruption=corruptions())
    def check(corruption: Corruption) -> None:
        damaged_path.write_bytes(corruption.apply(original))
        try:
            loaded = saved.load(damaged_path)
        except ValueError as error:
            assert str(damaged_path) in str(error)
        else:  # only damage without effect on the content (zip padding, an unused field)
            _same(saved.expected, loaded)

    check()
