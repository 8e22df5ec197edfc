import os

import pytest

from pyro_bqn import output_folder
from pyro_bqn.output_folder import OutputFolder, OutputFolderError

NEW = {"metrics.json": "new metrics.json", "summary.md": "new summary.md"}


def _results(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "summary.md"):
        (folder / name).write_text(f"{text} {name}")


def _contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_new_folder_is_created_at_commit_only(tmp_path):
    out = OutputFolder(tmp_path / "run")
    out.prepare()
    assert not out.path.exists() and out.staging.is_dir()
    _results(out.staging, "new")
    out.commit()
    assert _contents(out.path) == NEW
    assert not out.staging.exists() and not out.previous.exists()


def test_a_folder_with_results_is_refused_without_overwrite(tmp_path):
    _results(tmp_path / "run", "old")
    with pytest.raises(OutputFolderError, match="already holds results.*--overwrite"):
        OutputFolder(tmp_path / "run").prepare()
    assert not (tmp_path / ".run.partial").exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_keeps_the_old_results_until_commit_and_leaves_no_stale_file(
    tmp_path, monkeypatch, exchange
):
    if not exchange:
        monkeypatch.setattr(output_folder, "_exchange", lambda a, b: False)
    _results(tmp_path / "run", "old")
    (tmp_path / "run" / "entropy.png").write_text("stale")
    out = OutputFolder(tmp_path / "run", overwrite=True)
    out.prepare()
    _results(out.staging, "new")
    assert "entropy.png" in _contents(out.path)  # untouched until the new results are complete
    out.commit()
    assert _contents(out.path) == NEW
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_an_interrupted_run_must_be_resumed_or_overwritten(tmp_path):
    first = OutputFolder(tmp_path / "run")
    first.prepare()
    (first.staging / "checkpoint.pt").write_text("state")
    with pytest.raises(OutputFolderError, match="interrupted run.*--resume.*--overwrite"):
        OutputFolder(tmp_path / "run").prepare()
    (first.staging / ".metrics.json.x1y2.tmp").write_text("half of a killed write")
    resumed = OutputFolder(tmp_path / "run", resume=True)
    resumed.prepare()
    assert [p.name for p in resumed.staging.iterdir()] == ["checkpoint.pt"]
    assert (resumed.staging / "checkpoint.pt").read_text() == "state"
    OutputFolder(tmp_path / "run", overwrite=True).prepare()
    assert list(first.staging.iterdir()) == []


def test_resume_without_an_interrupted_run_is_refused(tmp_path):
    with pytest.raises(OutputFolderError, match="no interrupted run"):
        OutputFolder(tmp_path / "run", resume=True).prepare()


def test_previous_results_are_put_back_if_a_commit_died_between_its_renames(tmp_path):
    _results(tmp_path / ".run.previous", "old")  # the state after the first of two renames
    out = OutputFolder(tmp_path / "run", overwrite=True)
    out.prepare()
    assert _contents(out.path)["metrics.json"] == "old metrics.json"
    assert not out.previous.exists()


def test_a_file_and_an_unwritable_parent_are_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        OutputFolder(tmp_path / "file").prepare()
    # Tests may run as root, for whom every folder is writable: ask as a user would.
    monkeypatch.setattr(output_folder.os, "access", lambda path, mode: False)
    with pytest.raises(OutputFolderError, match="not writable"):
        OutputFolder(tmp_path / "run").prepare()
    assert not (tmp_path / ".run.partial").exists()
