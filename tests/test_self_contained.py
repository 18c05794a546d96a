"""A fresh clone with no shared data folder beside it runs the real-data tests: nothing outside is read."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests that read the real trajectories (the data's fixtures, the classifier, the torchtune data path).
REAL_DATA_TESTS = (
    "tests/test_real_data.py",
    "tests/test_torchtune_data.py::test_tokens_labels_identical_to_sftdataset_and_classes_match_reference",
)


@pytest.mark.slow
def test_real_data_tests_pass_in_a_clone_with_no_shared_folder(tmp_path):
    clone = tmp_path / "agent-obs"
    subprocess.run(["git", "clone", "--quiet", REPO, clone], check=True, capture_output=True, timeout=120)
    assert not (tmp_path / "shared").exists() and not (clone / "tests" / "data" / "trajectories").is_symlink()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -P: the clone's folder is not put on sys.path, so the library is this environment's install while the tests,
    # their conftest and their data are the clone's committed files (rootdir = the clone).
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *REAL_DATA_TESTS],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    files = list((clone / "tests" / "data" / "trajectories").glob("*.jsonl"))
    passed = re.search(r"(\d+) passed", out)
    assert files and passed and int(passed[1]) >= 2 * len(files), out[-2000:]  # each file's tests in both modules
    assert "skipped" not in out, out[-2000:]
