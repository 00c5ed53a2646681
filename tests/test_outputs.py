"""outputs.commit: a run replaces only what the previous run's manifest lists."""
import json

import pytest

from dmlcore import outputs


def _run(out, files, with_checkpoints=True, tag="1"):
    """What workflow.run does around a fit: claim the live folder, write a checkpoint, commit."""
    live = out / "checkpoints.partial"
    if with_checkpoints:
        outputs.check_free(out, outputs.FIXED_NAMES, dirs=["checkpoints.partial", "checkpoints"])
        outputs.claim_dir(out, "checkpoints.partial", reset=True)
        (live / f"ckpt-00000000{tag}.npz").write_bytes(b"x")
    outputs.commit(out, {name: tag.encode() for name in files},
                   checkpoints=[(live, out / "checkpoints")])


BASE = ["config.yaml", "model.npz", "metrics.json", "history.nc"]


def test_user_files_survive_a_run_and_a_rerun_with_fewer_plots(tmp_path):
    (tmp_path / "holiday.png").write_bytes(b"sun")
    (tmp_path / "notes.txt").write_text("mine")
    _run(tmp_path, BASE + ["loss_vs_step.png", "accuracy_vs_step.png"], tag="1")
    manifest = json.loads((tmp_path / outputs.MANIFEST).read_text())
    assert "loss_vs_step.png" in manifest["files"] and "holiday.png" not in manifest["files"]
    assert manifest["dirs"] == ["checkpoints"]
    _run(tmp_path, BASE + ["loss_vs_step.png"], tag="2")
    names = {p.name for p in tmp_path.iterdir()}
    assert "accuracy_vs_step.png" not in names                      # its own old plot: gone
    assert {"holiday.png", "notes.txt", "loss_vs_step.png"} <= names
    assert (tmp_path / "holiday.png").read_bytes() == b"sun"
    assert (tmp_path / "model.npz").read_bytes() == b"2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        outputs.DIR_MARK, "ckpt-000000002.npz"]
    assert not (tmp_path / "checkpoints.partial").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoints.old")]


def test_a_foreign_checkpoints_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "keep.txt").write_text("mine")
    for _ in range(2):
        with pytest.raises(outputs.OutputConflict, match="checkpoints exists and was not written"):
            _run(tmp_path, BASE)
        assert (tmp_path / "checkpoints" / "keep.txt").read_text() == "mine"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


@pytest.mark.parametrize("name", ["model.npz", "loss_vs_step.png", "checkpoints.partial"])
def test_a_name_taken_by_a_user_file_fails_before_anything_is_written(tmp_path, name):
    _run(tmp_path, BASE, tag="1")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    if name == "checkpoints.partial":
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    else:
        (tmp_path / name).unlink(missing_ok=True)
        before.pop(name, None)
        (tmp_path / name).write_bytes(b"users")
    # a fresh folder of the user's: the manifest does not list it
    manifest = json.loads((tmp_path / outputs.MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if f != name]
    (tmp_path / outputs.MANIFEST).write_text(json.dumps(manifest))
    before[outputs.MANIFEST] = (tmp_path / outputs.MANIFEST).read_bytes()
    with pytest.raises(outputs.OutputConflict, match=name):
        _run(tmp_path, BASE + ["loss_vs_step.png"], tag="2")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    if name != "checkpoints.partial":
        assert after.pop(name) == b"users"
    assert after == before
    if name == "checkpoints.partial":
        assert (tmp_path / name / "keep.txt").read_text() == "mine"


# ---- through the command line -----------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_keep_user_files_and_refuse_foreign_names(tmp_path):
    from test_cli import QUICK, WORKFLOWS, dmlcore

    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.png").write_bytes(b"sun")
    args = ["run", WORKFLOWS / "quickstart.yaml", *QUICK, "--no-progress",
            "--set", f"output.dir={out}"]
    for _ in range(2):                                   # a run and a rerun
        proc = dmlcore(*args)
        assert proc.returncode == 0, proc.stderr
        assert (out / "holiday.png").read_bytes() == b"sun"
    assert "holiday.png" not in json.loads((out / outputs.MANIFEST).read_text())["files"]
    # --resume of a checkpoint written for another model: exit 2, one line
    proc = dmlcore(*args, "--resume", "--set", "model.hidden=[8]")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "written for the model" in lines[0], proc.stderr
    # a foreign checkpoints/ folder in a fresh output dir: exit 2, one line, kept
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "keep.txt").write_text("mine")
    proc = dmlcore("run", WORKFLOWS / "quickstart.yaml", *QUICK, "--no-progress",
                   "--set", f"output.dir={other}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not written by dmlcore" in lines[0], proc.stderr
    assert (other / "checkpoints" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints"]
