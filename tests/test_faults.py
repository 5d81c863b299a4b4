"""kill -9 at random moments loses nothing: bench/faults.py's own loop, with a handful of kills."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_random_sigkills_lose_nothing(data_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--kills", "5", "--steps", "30",
                           "--seed", "3", "--data", str(data_dir)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kills"] == 5 and out["runs_completed"] >= 1, out
    assert out["failed_resumes"] == 0 and out["latest_dangling"] == 0, out
    assert out["max_abs_dweight"] == 0.0 and out["loss_curves_identical"], out
    assert out["steps_lost_max"] <= out["checkpoint_interval"], out
