"""A reader copies one script and common.py into an empty folder: it must run from there."""
import json
import shutil

import pytest

from conftest import METHODS, REPO, TINY, load, run_script


def test_simclr_and_linear_eval_run_alone(tmp_path):
    for name in ("simclr.py", "linear_eval.py", "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    run_script("simclr.py", *TINY, "--epochs", "1", "--max-steps", "2", "--knn-every", "0", cwd=tmp_path)
    assert (tmp_path / "runs" / "simclr" / "backbone.pt").exists()  # the default --output-dir
    run_script("linear_eval.py", "--ckpt", "runs/simclr/backbone.pt", "--mode", "fast", "--epochs", "1",
               "--batch-size", "32", "--device", "cpu", "--workers", "0", cwd=tmp_path)
    assert "top1" in json.loads((tmp_path / "runs" / "simclr" / "linear_eval_fast" / "results.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["common.py", "linear_eval.py", "runs", "simclr.py"]


@pytest.mark.parametrize("script", ["byol.py", "barlow.py", "dino.py"])
def test_other_methods_run_alone(tmp_path, script):
    for name in (script, "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    run_script(script, *TINY, *METHODS[script], "--epochs", "1", "--max-steps", "2", "--knn-every", "0", cwd=tmp_path)
    assert (tmp_path / "runs" / script[:-3] / "backbone.pt").exists()


def test_a_script_without_common_py_beside_it_fails(tmp_path):
    """The runs see only the script's folder (as python does): nothing of the repository leaks in."""
    shutil.copy(REPO / "simclr.py", tmp_path / "simclr.py")
    proc = run_script("simclr.py", "--help", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "No module named 'common'" in proc.stderr


def test_a_copy_for_a_new_method_renames_one_line_and_keeps_to_its_own_runs(tmp_path):
    """A researcher copies barlow.py to start another method and renames METHOD, one line: the copy
    saves to runs/<its name>, and refuses to go on with a Barlow Twins run (rather than train that
    model further with another loss, in the same metrics.csv)."""
    for name in ("barlow.py", "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    text = (REPO / "barlow.py").read_text()
    assert text.count('\nMETHOD = "barlow"\n') == 1
    (tmp_path / "vicreg.py").write_text(text.replace('\nMETHOD = "barlow"\n', '\nMETHOD = "vicreg"\n'))
    args = [*TINY, *METHODS["barlow.py"], "--epochs", "1", "--max-steps", "1", "--knn-every", "0"]
    run_script("barlow.py", *args, cwd=tmp_path)
    run_script("vicreg.py", *args, cwd=tmp_path)
    assert load(tmp_path / "runs" / "vicreg" / "last.pt")["method"] == "vicreg"
    proc = run_script("vicreg.py", *args, "--max-steps", "2", "--output-dir", "runs/barlow", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: runs/barlow/last.pt was written by barlow.py, not vicreg.py: resume from a vicreg.py checkpoint, "
        "or use another --output-dir")
    assert load(tmp_path / "runs" / "barlow" / "last.pt")["step"] == 1
