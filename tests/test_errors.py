"""Bad input: exit code 2, one `error:` line that says what is wrong and what to do, no traceback,
and nothing half-written.

Most cases run the CLI in this process (typer's CliRunner: same code path, no 2-5 s interpreter
start); a few run `python -m kdcache` for real, and the disk-full case needs its own process
(RLIMIT_FSIZE).
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from helpers import assert_one_line_error, cli, run_cli, written

from kdcache.data import write_fake_cifar10

ONE = {"OMP_NUM_THREADS": "1", "KDCACHE_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")  # never try to download anything from a test


# ---- bad files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, teacher_ckpt, cache_file) -> dict[str, Path]:
    """Broken and mismatched teacher checkpoints and caches, each made from the good ones."""
    d = tmp_path_factory.mktemp("bad")
    files = {"missing.pt": d / "missing.pt", "missing.h5": d / "missing.h5"}

    raw = teacher_ckpt.read_bytes()
    files["truncated.pt"] = d / "truncated.pt"
    files["truncated.pt"].write_bytes(raw[: len(raw) // 2])
    files["text.pt"] = d / "text.pt"
    files["text.pt"].write_text("model weights, honest\n")
    files["foreign.pt"] = d / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, files["foreign.pt"])
    record = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    files["future.pt"] = d / "future.pt"
    torch.save({**record, "format_version": 99}, files["future.pt"])

    raw = cache_file.read_bytes()
    files["truncated.h5"] = d / "truncated.h5"
    files["truncated.h5"].write_bytes(raw[: len(raw) // 2])
    files["text.h5"] = d / "text.h5"
    files["text.h5"].write_text("logits, honest\n")
    files["foreign.h5"] = d / "foreign.h5"
    with h5py.File(files["foreign.h5"], "w") as f:
        f["logits"] = [[1.0, 2.0]]

    def variant(name: str, **attrs) -> None:
        files[name] = d / name
        shutil.copy(cache_file, files[name])
        with h5py.File(files[name], "r+") as f:
            f.attrs.update(attrs)

    variant("future.h5", format_version=99)
    variant("incomplete.h5", complete=False, rows_done=128)
    variant("cifar100-classes.h5", num_classes=100)
    with h5py.File(files["cifar100-classes.h5"], "r+") as f:  # consistent: a real 100-class cache
        for name in ("logits", "test_logits"):
            shape = (*f[name].shape[:-1], 100)
            del f[name]
            f.create_dataset(name, shape, dtype="float16")

    # The cache path is missing, but an interrupted dump of it is there.
    files["interrupted.h5"] = d / "interrupted.h5"
    shutil.copy(files["incomplete.h5"], d / "interrupted.h5.partial")
    return files


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another dataset in the same layout and size: other images, other fingerprint."""
    root = tmp_path_factory.mktemp("other-data")
    write_fake_cifar10(root, num_train=1000, seed=1)
    return root


TEACHER_FILES = [
    ("missing.pt", ["does not exist", "kdcache teacher"]),
    ("truncated.pt", ["not a readable kdcache checkpoint", "truncated"]),
    ("text.pt", ["not a readable kdcache checkpoint", "not a PyTorch zip file"]),
    ("foreign.pt", ["not a kdcache checkpoint", "kdcache teacher"]),
    ("future.pt", ["format v99", "retrain"]),
]


@pytest.mark.parametrize("command", ["dump-logits", "verify"])
@pytest.mark.parametrize("name, needles", TEACHER_FILES, ids=[n for n, _ in TEACHER_FILES])
def test_bad_teacher_checkpoint(command, name, needles, bad, cache_file, data_dir, tmp_path):
    out = tmp_path / "out"
    if command == "dump-logits":
        args = ["dump-logits", "--teacher", bad[name], "--data-dir", data_dir, "--out", out / "c.h5", "--device", "cpu"]
    else:
        args = [
            "verify",
            cache_file,
            "--teacher",
            bad[name],
            "--data-dir",
            data_dir,
            "--samples",
            "8",
            "--device",
            "cpu",
        ]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, str(bad[name]), *needles)
    assert written(out) == []


def test_teacher_of_another_architecture(teacher_ckpt, data_dir, tmp_path):
    code, err, _ = cli(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--arch",
        "resnet18",
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "out" / "c.h5",
        "--device",
        "cpu",
    )
    assert_one_line_error(code, err, "seed-cnn-teacher", "not resnet18", "--arch seed-cnn-teacher")
    assert written(tmp_path / "out") == []


CACHE_FILES = [
    ("missing.h5", ["does not exist", "dump-logits"]),
    ("truncated.h5", ["not a readable HDF5 file", "truncated"]),
    ("text.h5", ["not a readable HDF5 file"]),
    ("foreign.h5", ["not a kdcache logit cache", "dump-logits"]),
    ("future.h5", ["format v99", "recreate it"]),
]


@pytest.mark.parametrize("command", ["student", "inspect", "verify"])
@pytest.mark.parametrize("name, needles", CACHE_FILES, ids=[n for n, _ in CACHE_FILES])
def test_bad_cache(command, name, needles, bad, teacher_ckpt, data_dir, tmp_path):
    out = tmp_path / "out"
    args = {
        "student": [
            "student",
            "--preset",
            "seed-cnn",
            "--cache",
            bad[name],
            "--data-dir",
            data_dir,
            "--out",
            out / "s.pt",
            "--device",
            "cpu",
        ],
        "inspect": ["inspect", bad[name]],
        "verify": ["verify", bad[name], "--teacher", teacher_ckpt, "--data-dir", data_dir, "--device", "cpu"],
    }[command]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, str(bad[name]), *needles)
    assert written(out) == []


STUDENT_MISMATCHES = [
    ("incomplete", "incomplete.h5", [], ["incomplete", "--resume"]),
    ("interrupted", "interrupted.h5", [], ["interrupted.h5.partial", "--resume"]),
    ("class-count", "cifar100-classes.h5", [], ["100 classes", "10"]),
    ("subset", None, ["--subset", "200"], ["other training images", "--subset"]),
    ("data", None, ["--data-dir", "OTHER"], ["other training images", "--data-dir"]),
]


@pytest.mark.parametrize("case, name, extra, needles", STUDENT_MISMATCHES, ids=[c[0] for c in STUDENT_MISMATCHES])
def test_student_refuses_a_cache_it_cannot_trust(
    case, name, extra, needles, bad, cache_file, data_dir, other_data, tmp_path
):
    cache = bad[name] if name else cache_file
    extra = [str(other_data) if a == "OTHER" else a for a in extra]
    args = [
        "student",
        "--preset",
        "seed-cnn",
        "--cache",
        cache,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "out" / "s.pt",
        "--device",
        "cpu",
        *extra,
    ]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, *needles)
    assert written(tmp_path / "out") == []


# ---- bad flags -----------------------------------------------------------------------------------

FLAGS = [
    ("teacher", ["--epochs", "0"], "--epochs"),
    ("teacher", ["--batch-size", "0"], "--batch-size"),
    ("teacher", ["--subset", "5000"], "--subset 5000"),
    ("teacher", ["--subset", "0"], "--subset"),
    ("student", ["--epochs", "0"], "--epochs"),
    ("student", ["--batch-size", "0"], "--batch-size"),
    ("student", ["--T", "0"], "--T"),
    ("student", ["--T", "-1"], "--T"),
    ("student", ["--alpha", "-0.1"], "--alpha"),
    ("student", ["--alpha", "1.5"], "--alpha"),
    ("student", ["--subset", "5000"], "--subset 5000"),
    ("student", ["--schedule", "step"], "--schedule"),
    ("teacher", ["--optimizer", "rmsprop"], "--optimizer"),
    ("teacher", ["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs"),
    ("student", ["--optimizer", "adam", "--nesterov"], "--nesterov"),
    ("dump-logits", ["--views", "0"], "--views"),
    ("dump-logits", ["--views", "-2"], "--views"),
    ("dump-logits", ["--batch-size", "0"], "--batch-size"),
    ("dump-logits", ["--block-rows", "0"], "--block-rows"),
    ("dump-logits", ["--subset", "5000"], "--subset 5000"),
    ("inspect", ["--T", "0"], "--T"),
    ("verify", ["--samples", "-1"], "--samples"),
]


def command_args(command: str, *, teacher: Path, cache: Path, data_dir: Path, out: Path) -> list:
    """A valid invocation of `command` writing into `out` (a folder), to add one bad flag to."""
    return {
        "teacher": [
            "teacher",
            "--preset",
            "seed-cnn",
            "--data-dir",
            data_dir,
            "--out",
            out / "t.pt",
            "--device",
            "cpu",
        ],
        "student": [
            "student",
            "--preset",
            "seed-cnn",
            "--cache",
            cache,
            "--data-dir",
            data_dir,
            "--out",
            out / "s.pt",
            "--device",
            "cpu",
        ],
        "dump-logits": [
            "dump-logits",
            "--teacher",
            teacher,
            "--data-dir",
            data_dir,
            "--out",
            out / "c.h5",
            "--device",
            "cpu",
        ],
        "inspect": ["inspect", cache],
        "verify": ["verify", cache, "--teacher", teacher, "--data-dir", data_dir, "--device", "cpu"],
    }[command]


@pytest.mark.parametrize("command, flags, needle", FLAGS, ids=[f"{c} {' '.join(f)}" for c, f, _ in FLAGS])
def test_bad_flag(command, flags, needle, teacher_ckpt, cache_file, data_dir, tmp_path):
    out = tmp_path / "out"
    args = command_args(command, teacher=teacher_ckpt, cache=cache_file, data_dir=data_dir, out=out)
    code, err, _ = cli(*args, *flags)
    assert_one_line_error(code, err, needle)
    assert written(out) == []


# ---- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["teacher", "student", "dump-logits"])
def test_output_folder_that_cannot_be_written(command, teacher_ckpt, cache_file, data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    args = command_args(command, teacher=teacher_ckpt, cache=cache_file, data_dir=data_dir, out=blocker / "sub")
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, "cannot write", "--out")
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["teacher", "student", "dump-logits"])
def test_existing_output_is_refused_and_left_untouched(command, teacher_ckpt, cache_file, data_dir, tmp_path):
    args = command_args(command, teacher=teacher_ckpt, cache=cache_file, data_dir=data_dir, out=tmp_path)
    target = Path(args[args.index("--out") + 1])
    target.write_bytes(b"precious results\n")
    stamp = target.stat().st_mtime_ns
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, str(target), "already exists", "--force")
    assert target.read_bytes() == b"precious results\n" and target.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_force_overwrites_an_existing_cache(teacher_ckpt, data_dir, tmp_path):
    target = tmp_path / "c.h5"
    target.write_bytes(b"old\n")
    code, err, out = cli(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--data-dir",
        data_dir,
        "--out",
        target,
        "--subset",
        "20",
        "--views",
        "1",
        "--device",
        "cpu",
        "--force",
    )
    assert code == 0, err
    with h5py.File(target, "r") as f:
        assert f.attrs["complete"] and f["logits"].shape == (20, 1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


@pytest.mark.parametrize("command", ["teacher", "student", "dump-logits"])
def test_no_data_and_no_network(command, teacher_ckpt, cache_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    args = command_args(command, teacher=teacher_ckpt, cache=cache_file, data_dir=empty, out=out)
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, "not found", str(empty))
    assert written(out) == [] and written(empty) == []


# ---- the same, as real processes ---------------------------------------------------------------


def test_real_processes_exit_2_with_one_line(bad, teacher_ckpt, cache_file, data_dir, tmp_path):
    """A few of the above through `python -m kdcache`: exit code and stderr exactly as a shell sees them."""
    out = tmp_path / "out"
    cpu = ["--device", "cpu"]
    cases = [
        (
            ["dump-logits", "--teacher", bad["truncated.pt"], "--data-dir", data_dir, "--out", out / "c.h5", *cpu],
            "truncated",
        ),
        (
            ["student", "--cache", cache_file, "--data-dir", data_dir, "--alpha", "1.5", "--out", out / "s.pt", *cpu],
            "--alpha",
        ),
        (
            ["teacher", "--preset", "seed-cnn", "--data-dir", tmp_path / "nothing", "--out", out / "t.pt", *cpu],
            "not found",
        ),
    ]
    for args, needle in cases:
        r = run_cli(*[str(a) for a in args], env=ONE)
        assert_one_line_error(r.returncode, r.stderr, needle)
        assert r.stdout == ""
    assert written(out) == []


@pytest.mark.parametrize("limit", [3_000, 20_000], ids=["at-creation", "mid-dump"])
def test_disk_full_during_dump(limit, teacher_ckpt, data_dir, tmp_path):
    """The file-size limit makes writes fail with EFBIG, as a full disk does with ENOSPC.

    The finished cache is about 36 kB: the first limit fails while the file is being set up,
    the second after some blocks were written.
    """
    out = tmp_path / "c.h5"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_cli(
        "dump-logits",
        "--teacher",
        str(teacher_ckpt),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--subset",
        "100",
        "--views",
        "4",
        "--block-rows",
        "10",
        "--batch-size",
        "100",
        "--device",
        "cpu",
        env=ONE,
        preexec_fn=small_files,
    )
    assert_one_line_error(r.returncode, r.stderr, "disk", str(out), "removed", "free", started=True)
    assert not out.exists()
    partial = tmp_path / "c.h5.partial"
    if partial.exists():  # allowed only as an honest, resumable partial
        with h5py.File(partial, "r") as f:
            assert not f.attrs["complete"]
    assert os.listdir(tmp_path) in ([], ["c.h5.partial"])
