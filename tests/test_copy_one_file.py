"""A reader copies one script and common.py into an empty folder: it must run from there."""
import json
import shutil

import pytest

from conftest import METHODS, REPO, TINY, run_script


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
