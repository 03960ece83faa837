"""fastvit.checkpoint: atomic step folders, keep-last-K, and which folders resume may use (one process, no group)."""
import warnings

import pytest
import torch

from fastvit import checkpoint


def state(step, value):
    return {"model": {"w": torch.full((3, 4), float(value))}, "trainer": {"step": step, "samples_seen": 8 * step}}


def test_save_renames_complete_folder_and_roundtrips(tmp_path):
    final = checkpoint.save(tmp_path, 7, state(7, 1.5), {"model": {"name": "x"}})
    assert final == tmp_path / "checkpoints" / "step_00000007"
    assert (final / ".metadata").is_file() and checkpoint.read_config(final) == {"model": {"name": "x"}}
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    loaded = state(0, 0.0)
    checkpoint.load(final, loaded)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 4), 1.5))
    assert loaded["trainer"] == {"step": 7, "samples_seen": 56}
    assert checkpoint.checkpoint_step(final) == 7


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, state(step, step), {}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    # a broken folder counts for nothing: it goes once two complete checkpoints are newer, not before
    (root / "step_00000005" / ".metadata").write_bytes(b"\x80\x04garbage")
    checkpoint.save(tmp_path, 6, state(6, 6), {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005", "step_00000006"]
    checkpoint.save(tmp_path, 7, state(7, 7), {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000007"]


def test_candidates_skip_incomplete_and_corrupt_with_warnings(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, state(step, step), {})
    root = tmp_path / "checkpoints"
    (root / "step_00000003" / ".metadata").write_bytes(b"\x80\x04garbage")         # corrupt metadata
    (root / "step_00000004" / ".metadata").unlink()                              # never finished
    (root / "step_00000005.tmp").mkdir()                                          # killed while saving
    (root / "notes").mkdir()                                                      # not a checkpoint: ignored
    with pytest.warns(checkpoint.CheckpointWarning) as record:
        found = checkpoint.resume_candidates(tmp_path)
    assert [p.name for p in found] == ["step_00000002", "step_00000001"]
    messages = " ".join(str(w.message) for w in record)
    for name, why in (("step_00000003", "unreadable metadata"), ("step_00000004", "no .metadata"),
                      ("step_00000005.tmp", "incomplete")):
        assert name in messages and why in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(checkpoint.resume_candidates(tmp_path, warn=False)) == 2
    checkpoint.remove_incomplete(tmp_path)
    assert not (root / "step_00000005.tmp").exists()


def test_bad_names_raise():
    with pytest.raises(ValueError, match="step_00000042"):
        checkpoint.checkpoint_step("/tmp/latest")


def test_a_runs_checkpoints_folder_is_named_as_such(tmp_path):
    """--init / --resume given a run's checkpoints/ folder (its step folders inside) says to pass the run folder or a
    step folder, not that it holds no checkpoint."""
    checkpoint.save(tmp_path, 3, state(3, 1.0), {})
    with pytest.raises(ValueError, match=rf"it is the checkpoints/ folder of run {tmp_path}: pass the run folder, or "
                                         r"one of the step folders in it"):
        checkpoint.find_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000003"
