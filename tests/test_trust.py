"""No code runs unless the user names it: crafted files whose loading would write a marker file are refused
with one line (exit 2, no traceback), and the explicit opt-ins load what they are meant to."""

from __future__ import annotations

import torch

from conftest import run_cli
from kdcache.models import build, read_checkpoint

ONE = ["--device", "cpu"]


class Payload:
    """Unpickling this creates `marker`: what a crafted file could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def refused(res, marker, *needles: str) -> str:
    """The run stopped on one line, exit 2, before the file's code could run; returns that line."""
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not marker.exists(), "the file's code ran"
    for needle in needles:
        assert needle in res.stderr, res.stderr
    return res.stderr.strip()


def import_teacher(path, data_dir, out, *extra):
    return run_cli("import-teacher", str(path), "--arch", "seed-cnn-teacher", "--data-dir", str(data_dir),
                   "--out", str(out), *extra, *ONE)  # fmt: skip


def test_import_teacher_loads_no_pickled_code_without_the_flag(tmp_path, teacher_ckpt, data_dir):
    marker, out = tmp_path / "ran", tmp_path / "imported.pt"
    crafted = tmp_path / "crafted.pt"  # a real state dict beside the payload: the old fallback imported it
    torch.save({"state_dict": read_checkpoint(teacher_ckpt)["state_dict"], "extra": Payload(marker)}, crafted)
    refused(import_teacher(crafted, data_dir, out), marker, "torch.save(model.state_dict(), PATH)", "--trust-pickle")
    assert not out.exists()


def test_a_whole_pickled_model_needs_trust_pickle(tmp_path, teacher_ckpt, data_dir):
    model = build("seed-cnn-teacher", 10)
    model.load_state_dict(read_checkpoint(teacher_ckpt)["state_dict"])
    whole, out = tmp_path / "whole.pt", tmp_path / "imported.pt"
    torch.save(model, whole)
    refused(import_teacher(whole, data_dir, out), tmp_path / "unused", "--trust-pickle")
    assert not out.exists()
    res = import_teacher(whole, data_dir, out, "--trust-pickle")
    assert res.returncode == 0 and out.exists(), res.stderr
    assert "--trust-pickle" in run_cli("import-teacher", "--help").stdout


def test_import_teacher_one_line_errors(tmp_path, data_dir):
    weights = tmp_path / "w.pt"
    torch.save(build("seed-cnn-teacher", 10).state_dict(), weights)
    notes = tmp_path / "notes.pt"
    notes.write_text("not weights\n")
    refused(import_teacher(notes, data_dir, tmp_path / "a.pt"), tmp_path / "unused", "not a PyTorch file")
    refused(import_teacher(weights, data_dir, tmp_path / "b.pt", "--batch-size", "0"), tmp_path / "unused",
            "--batch-size must be >= 1")  # fmt: skip
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
