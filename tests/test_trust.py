"""No code runs unless the user names it: crafted files whose loading would write a marker file are refused
with one line (exit 2, no traceback), and the explicit opt-ins load what they are meant to."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import ROOT, SHARED_CIFAR, run_cli
from typer.testing import CliRunner

from kdcache.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from kdcache.cli import app
from kdcache.data import _unpickle, load_dataset, write_fake_cifar10
from kdcache.errors import KDCacheError
from kdcache.models import build

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
    return run_cli(
        "import-teacher",
        str(path),
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        *extra,
        *ONE,
    )


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
    refused(
        import_teacher(weights, data_dir, tmp_path / "b.pt", "--batch-size", "0"),
        tmp_path / "unused",
        "--batch-size must be >= 1",
    )
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


SPEC = "planted_arch:factory"


@pytest.fixture
def planted(tmp_path, teacher_ckpt):
    """A checkpoint of SPEC, whose module creates a marker when imported; returns (checkpoint, marker, the
    environment that puts the module on a subprocess's path: the worst case, the code is there to run)."""
    marker = tmp_path / "ran"
    (tmp_path / "planted_arch.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nimport torch\n\n\n"
        "def factory(num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, num_classes))\n"
    )
    record = read_checkpoint(teacher_ckpt)
    meta = {k: v for k, v in record.items() if k not in ("state_dict", "arch", "format", "format_version")}
    path = tmp_path / "planted.pt"
    save_checkpoint(path, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10)), arch=SPEC, meta=meta)
    return path, marker, {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}


def test_a_checkpoint_naming_code_is_refused_wherever_it_is_loaded(
    tmp_path, planted, teacher_ckpt, cache_file, data_dir
):
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
    res = run_cli(
        "student",
        "--online-teacher",
        str(ckpt),
        "--arch",
        "seed-cnn-student",
        "--trust-arch",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--subset",
        "128",
        "--out",
        str(out),
        *ONE,
        env=env,
    )
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


@pytest.mark.parametrize(
    "key, value",
    [("classes", "not json ["), ("recipe", "[1, 2]"), ("ensemble_members", '[{"path": 1}]'), ("data_options", "nan?")],
)
def test_cache_attributes_that_are_not_json_are_one_line(tmp_path, cache_file, key, value):
    crafted = tmp_path / "cache.h5"
    shutil.copy(cache_file, crafted)
    with h5py.File(crafted, "r+") as f:
        f.attrs[key] = value
    refused(run_cli("inspect", str(crafted)), tmp_path / "unused", f"has an attribute {key} that is not the JSON")


def _cifar(root, mutate) -> Path:
    """A generated CIFAR-10 folder (100 training images) with one file rewritten by `mutate(folder)`."""
    folder = write_fake_cifar10(root, num_train=100)
    mutate(folder)
    return root


def _batch(folder: Path, name: str = "data_batch_1") -> dict:
    return pickle.loads((folder / name).read_bytes())


def _write(folder: Path, name: str, obj, protocol: int = 4) -> None:
    (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1", "test_batch"])
def test_a_cifar_pickle_that_names_code_is_refused(tmp_path, name):
    marker = tmp_path / "ran"
    root = _cifar(tmp_path / "data", lambda f: _write(f, name, {**_batch(f, name), "batch_label": Payload(marker)}))
    res = run_cli(
        "teacher",
        "--preset",
        "seed-cnn",
        "--data-dir",
        str(root),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "t.pt"),
        *ONE,
    )
    refused(res, marker, f"cannot read {root / 'cifar-10-batches-py' / name}", "code a CIFAR batch never holds")
    assert not (tmp_path / "t.pt").exists()


def _retyped(key, value):
    return lambda f: _write(
        f, "data_batch_2", {**_batch(f, "data_batch_2"), key: value(_batch(f, "data_batch_2")[key])}
    )


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            _retyped("data", lambda x: x.astype(np.float32)),
            "data_batch_2 holds its pixels as a float32 array, not uint8",
        ),
        (_retyped("data", lambda x: x.tolist()), "data_batch_2 holds its pixels as a list, not uint8"),
        (_retyped("data", lambda x: x.reshape(-1, 3, 32, 32)), "holds pixels of shape [20, 3, 32, 32], not [N, 3072]"),
        (
            _retyped("labels", lambda y: [str(v) for v in y]),
            "data_batch_2 holds 'labels' that are not a list of whole numbers",
        ),
        (_retyped("labels", lambda y: y[:-1]), "data_batch_2 holds 20 images but 19 labels"),
        (_retyped("labels", lambda y: [10] * len(y)), "data_batch_2 has labels outside 0..9"),
        (lambda f: _write(f, "test_batch", [1, 2]), "test_batch holds a list, not the dict of a CIFAR batch"),
        (lambda f: _write(f, "batches.meta", {"label_names": ["a", "b"]}), "batches.meta does not name 10 classes"),
        (
            lambda f: _write(f, "batches.meta", {**_batch(f, "batches.meta"), "num_cases_per_batch": "20"}),
            "batches.meta states '20' images per batch",
        ),
    ],
)
def test_cifar_batches_of_the_wrong_types_and_shapes_are_one_line(tmp_path, mutate, needle):
    root = _cifar(tmp_path / "data", mutate)
    res = CliRunner().invoke(
        app,
        [
            "teacher",
            "--preset",
            "seed-cnn",
            "--data-dir",
            str(root),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "t.pt"),
            *ONE,
        ],
    )
    assert res.exit_code == 2 and needle in res.output and "replace it with an intact copy" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "t.pt").exists()


def test_cifar_copies_pickled_by_any_python_load_alike(tmp_path):
    """Protocols 0-5, labels as numpy arrays or numpy scalars: all read, to the same images and labels."""
    folder = write_fake_cifar10(tmp_path / "data", num_train=100)
    want = load_dataset("cifar10", tmp_path / "data", download=False)
    for protocol, labels in ((0, np.asarray), (2, lambda y: [np.int64(v) for v in y]), (5, np.asarray)):
        for name in ("data_batch_1", "test_batch"):
            d = _batch(folder, name)
            _write(folder, name, {**d, "labels": labels(d["labels"]), "filenames": [b"x.png"] * 20}, protocol)
        got = load_dataset("cifar10", tmp_path / "data", download=False)
        assert got.fingerprint == want.fingerprint and torch.equal(got.test_y, want.test_y)


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_CIFAR / "cifar-10-batches-py").is_dir(), reason="no ../shared/cifar10")
def test_the_real_cifar_files_pass_the_restricted_unpickler():
    folder = SHARED_CIFAR / "cifar-10-batches-py"
    d = _unpickle(folder / "data_batch_1")
    assert d["data"].dtype == np.uint8 and d["data"].shape == (10000, 3072) and len(d["labels"]) == 10000
    assert _unpickle(folder / "batches.meta")["label_names"][0] == "airplane"


def test_image_folders_decode_only_their_formats(tmp_path, monkeypatch):
    """An EPS file named .jpg would be rendered by Ghostscript, an external program: it is a bad image instead."""
    from PIL import EpsImagePlugin

    from kdcache import folders

    marker = tmp_path / "ran"
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: marker.touch())
    root = folders.write_image_folder(tmp_path / "d")
    (root / "train" / "class_00" / "x.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    train, _, _, where = folders.prepare(root, 32, skip_bad=True)
    assert json.loads((where / "meta.json").read_text())["train_skipped"][0].startswith("train/class_00/x.jpg")
    assert not marker.exists()
