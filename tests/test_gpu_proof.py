"""`make gpu-proof` at a tiny scale on CPU, so the one-command GPU proof cannot rot: every stage runs
through the real CLI and the JSON holds every row."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, THREAD_ENV

from kdcache.data import write_fake_cifar10

pytestmark = pytest.mark.e2e

ROWS = [
    "teacher",
    "teacher_2 (seed 1)",
    "dump (mixed, ensemble)",
    "alone, crop/flip",
    "alone, mixed views",
    "FM KD T=3 alpha=0.5",
    "FM KD T=1 alpha=1",
    "online FM KD T=3 alpha=0.5",
    "bench",
]


def test_the_gpu_proof_runs_end_to_end_at_a_tiny_scale(tmp_path):
    write_fake_cifar10(tmp_path / "data", num_train=300)
    out = tmp_path / "proof"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_proof.py"),
            "--tiny",
            "--device",
            "cpu",
            "--budget-s",
            "1500",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**__import__("os").environ, **THREAD_ENV},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "proof.json").read_text())
    assert [r["stage"] for r in record["rows"]] == ROWS
    assert all(r["status"] == "ok" for r in record["rows"])
    by = {r["stage"]: r for r in record["rows"]}
    assert 0 <= by["FM KD T=3 alpha=0.5"]["test_acc"] <= 1 and "test_acc_tta_flip" in by["teacher"]
    assert by["dump (mixed, ensemble)"]["cache_mb"] > 0 and record["bench"]["cached_img_s"] > 0
    assert "wrote" in done.stdout and "FM KD T=1 alpha=1" in done.stdout


def test_the_gpu_proof_stops_at_its_budget(tmp_path):
    out = tmp_path / "proof"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_proof.py"),
            "--tiny",
            "--device",
            "cpu",
            "--budget-s",
            "0",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    record = json.loads((out / "proof.json").read_text())
    assert done.returncode == 1 and all(r["status"] == "skipped (budget spent)" for r in record["rows"])
