"""Teachers from elsewhere: import-teacher wraps weights into a checkpoint; ensembles cache the
log of the members' mean softmax and verify replays them."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from typer.testing import CliRunner

from kdcache.checkpoints import load_checkpoint, read_checkpoint
from kdcache.cli import app

ONE = ["--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def weights(tmp_path, teacher_ckpt):
    """The session teacher's weights as another tool would save them: nested, with a DDP prefix."""
    state = read_checkpoint(teacher_ckpt)["state_dict"]
    path = tmp_path / "elsewhere.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_imported_weights_score_what_they_scored_before(tmp_path, weights, teacher_ckpt, data_dir):
    meta0 = read_checkpoint(teacher_ckpt)
    mean, std = (",".join(map(str, meta0[k])) for k in ("normalize_mean", "normalize_std"))
    out = tmp_path / "imported.pt"
    res = invoke(
        "import-teacher",
        weights,
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        data_dir,
        "--mean",
        mean,
        "--std",
        std,
        "--out",
        out,
        *ONE,
    )
    assert res.exit_code == 0, res.output
    model, meta = load_checkpoint(out)
    assert meta["imported_from"] == str(weights) and meta["dataset_fingerprint"]
    assert meta["metrics"]["test_acc"] == pytest.approx(meta0["metrics"]["test_acc"])
    assert "validation accuracy" in res.output
    # whole saved models import too, when the user says the file may run code
    whole = tmp_path / "whole.pt"
    torch.save(model, whole)
    assert (
        invoke(
            "import-teacher",
            whole,
            "--arch",
            "seed-cnn-teacher",
            "--data-dir",
            data_dir,
            "--out",
            tmp_path / "w.pt",
            "--trust-pickle",
            *ONE,
        ).exit_code
        == 0
    )


@pytest.mark.parametrize(
    "arch, needle",
    [
        ("seed-cnn-student", "does not fit seed-cnn-student: missing"),
        ("resnet18", "does not fit resnet18: missing conv1.weight"),
    ],
)
def test_weights_of_another_model_name_the_keys(tmp_path, weights, data_dir, arch, needle):
    res = invoke("import-teacher", weights, "--arch", arch, "--data-dir", data_dir, "--out", tmp_path / "x.pt", *ONE)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "x.pt").exists()


def test_weights_for_another_class_count(tmp_path, data_dir):
    from kdcache.models import build

    torch.save(build("seed-cnn-teacher", 100).state_dict(), tmp_path / "c100.pt")
    res = invoke(
        "import-teacher",
        tmp_path / "c100.pt",
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "x.pt",
        *ONE,
    )
    assert res.exit_code == 2 and "is for 100 classes" in res.output and "data has 10" in res.output


@pytest.mark.parametrize(
    "content, args, needle",
    [
        (b"not a torch file", [], "cannot be read as PyTorch weights (not a PyTorch file"),
        (None, ["--batch-size", "0"], "--batch-size must be >= 1"),
        (None, ["--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
        (None, ["--mean", "0.5,0.5", "--std", "1,1,1"], "--mean takes three numbers"),
    ],
)
def test_bad_import_input(tmp_path, weights, data_dir, content, args, needle):
    path = weights
    if content is not None:
        path = tmp_path / "bad.pt"
        path.write_bytes(content)
    res = invoke(
        "import-teacher",
        path,
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "x.pt",
        *args,
        *ONE,
    )
    assert res.exit_code == 2 and needle in res.output, res.output


def test_an_ensemble_cache_holds_the_log_mean_softmax_and_verifies(tmp_path, teacher_ckpt, data_dir):
    from kdcache.config import get_preset
    from kdcache.inference import predict
    from kdcache.runtime import Runtime
    from kdcache.stages import train_teacher
    from kdcache.views import CropFlip, Views, view_params

    rt = Runtime.create("cpu", "fp32")
    second = tmp_path / "t2.pt"
    train_teacher(
        get_preset("seed-cnn").override(batch_size=64, subset=400, seed=5).override_teacher(epochs=1),
        data_dir=data_dir,
        out=second,
        rt=rt,
    )
    cache = tmp_path / "ens.h5"
    res = invoke(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--teacher",
        second,
        "--views",
        2,
        "--subset",
        64,
        "--data-dir",
        data_dir,
        "--out",
        cache,
        *ONE,
    )
    assert res.exit_code == 0, res.output
    with h5py.File(cache) as f:
        members = json.loads(f.attrs["ensemble_members"])
        cached = torch.from_numpy(f["logits"][:4, 0]).float()
    assert [m["path"] for m in members] == [str(teacher_ckpt), str(second)]
    assert all(len(m["sha256"]) == 64 and 0 <= m["test_acc"] <= 1 for m in members)
    # by hand: each member on its own normalisation, softmax, mean, log
    from kdcache.data import load_dataset

    data = load_dataset("cifar10", data_dir, 64)
    params = view_params(0, range(4), [0])[:, 0]
    probs = []
    for path in (teacher_ckpt, second):
        model, meta = load_checkpoint(path)
        logits = predict(
            model,
            data.train_x,
            meta["normalize_mean"],
            meta["normalize_std"],
            rt,
            rows=torch.arange(4),
            views=Views(CropFlip(), params),
        )
        probs.append(logits.softmax(1))
    expected = torch.stack(probs).mean(0).log()
    assert torch.allclose(cached, expected, atol=0.02), (cached, expected)
    ok = invoke(
        "verify", cache, "--teacher", teacher_ckpt, "--teacher", second, "--data-dir", data_dir, "--samples", 16
    )
    assert ok.exit_code == 0, ok.output
    one = invoke("verify", cache, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", 16)
    assert one.exit_code == 1 and "ensemble of 2 teachers" in one.output
    swapped = invoke(
        "verify", cache, "--teacher", second, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", 4
    )
    assert swapped.exit_code == 1


def test_ensemble_members_must_share_classes(tmp_path, teacher_ckpt, data_dir):
    record = read_checkpoint(teacher_ckpt)
    record["classes"] = [f"other{i}" for i in range(10)]
    torch.save(record, tmp_path / "other.pt")
    res = invoke(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--teacher",
        tmp_path / "other.pt",
        "--views",
        1,
        "--no-augment",
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "e.h5",
        *ONE,
    )
    assert res.exit_code == 2 and "ensemble members differ in classes" in res.output, res.output
    assert not (tmp_path / "e.h5").exists()
