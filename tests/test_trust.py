"""No code runs unless the user names it: crafted files whose loading would write a marker file are refused
with one line (exit 2, no traceback), and the explicit opt-ins load what they are meant to."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import pytest
import torch

from conftest import ROOT, run_cli
from kdcache.errors import KDCacheError
from kdcache.models import build, load_checkpoint, read_checkpoint, save_checkpoint

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


SPEC = "planted_arch:factory"


@pytest.fixture
def planted(tmp_path, teacher_ckpt):
    """A checkpoint of SPEC, whose module creates a marker when imported; returns (checkpoint, marker, the
    environment that puts the module on a subprocess's path: the worst case, the code is there to run)."""
    marker = tmp_path / "ran"
    (tmp_path / "planted_arch.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nimport torch\n\n\n"
        "def factory(num_classes):\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, num_classes))\n"
    )
    record = read_checkpoint(teacher_ckpt)
    meta = {k: v for k, v in record.items() if k not in ("state_dict", "arch", "format", "format_version")}
    path = tmp_path / "planted.pt"
    save_checkpoint(path, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)), arch=SPEC, meta=meta)
    return path, marker, {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def test_a_checkpoint_naming_code_is_refused_wherever_it_is_loaded(tmp_path, planted, teacher_ckpt, cache_file, data_dir):
    ckpt, marker, env = planted
    out, d = tmp_path / "out", str(data_dir)
    commands = [
        ["eval", str(ckpt), "--data-dir", d],
        ["dump-logits", "--teacher", str(ckpt), "--data-dir", d, "--out", str(out)],
        ["dump-logits", "--teacher", str(teacher_ckpt), "--teacher", str(ckpt), "--data-dir", d, "--out", str(out)],
        ["verify", str(cache_file), "--teacher", str(ckpt), "--data-dir", d, "--samples", "8"],
        ["student", "--online-teacher", str(ckpt), "--arch", "seed-cnn-student", "--data-dir", d, "--out", str(out)],
        ["pipeline", "--preset", "seed-cnn", "--teacher", str(ckpt), "--data-dir", d, "--out", str(out)],
    ]
    for args in commands:
        refused(run_cli(*args, *ONE, env=env), marker, f"names the architecture {SPEC}", "--trust-arch")
        assert not out.exists(), args


def test_naming_the_spec_or_trust_arch_builds_it(tmp_path, planted, data_dir):
    ckpt, marker, env = planted
    for flags in (["--arch", SPEC], ["--trust-arch"]):
        res = run_cli("eval", str(ckpt), "--data-dir", str(data_dir), *flags, *ONE, env=env)
        assert res.returncode == 0 and "test accuracy" in res.stdout, res.stderr
        assert marker.exists()  # the user named it: the module was imported
        marker.unlink()
    out = tmp_path / "online.pt"
    res = run_cli("student", "--online-teacher", str(ckpt), "--arch", "seed-cnn-student", "--trust-arch", "--data-dir",
                  str(data_dir), "--epochs", "1", "--subset", "128", "--out", str(out), *ONE, env=env)  # fmt: skip
    assert res.returncode == 0 and out.exists() and marker.exists(), res.stderr
    marker.unlink()
    with pytest.raises(KDCacheError, match="pass --trust-arch"):  # the library refuses it too
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_recorded_student_arch_naming_code_is_refused(tmp_path, planted, cache_file, data_dir):
    _, marker, env = planted
    crafted = tmp_path / "cache.h5"
    shutil.copy(cache_file, crafted)
    with h5py.File(crafted, "r+") as f:
        f.attrs["recipe"] = json.dumps({**json.loads(f.attrs["recipe"]), "student_arch": SPEC})
    out = tmp_path / "s.pt"
    args = ["student", "--cache", str(crafted), "--data-dir", str(data_dir), "--epochs", "1", "--out", str(out), *ONE]
    refused(run_cli(*args, env=env), marker, "the recipe recorded in", f"pass --arch {SPEC}")
    assert not out.exists()
    res = run_cli(*args, "--arch", "seed-cnn-student", env=env)  # another --arch: the recorded one is not built
    assert res.returncode == 0 and out.exists() and not marker.exists(), res.stderr


@pytest.mark.parametrize("key, value", [("classes", "not json ["), ("recipe", "[1, 2]"),
                                        ("ensemble_members", '[{"path": 1}]'), ("data_options", "nan?")])  # fmt: skip
def test_cache_attributes_that_are_not_json_are_one_line(tmp_path, cache_file, key, value):
    crafted = tmp_path / "cache.h5"
    shutil.copy(cache_file, crafted)
    with h5py.File(crafted, "r+") as f:
        f.attrs[key] = value
    refused(run_cli("inspect", str(crafted)), tmp_path / "unused", f"has an attribute {key} that is not the JSON")
