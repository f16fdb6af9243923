"""--tensorboard DIR: the metrics log's per-epoch records as TensorBoard scalars, read back from the event files."""

import json
import sys

import pytest
from helpers import TINY, assert_one_line_error, cli, written
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdcache.errors import KDCacheError
from kdcache.pipeline import run_pipeline
from kdcache.tblog import EpochScalars


def scalars(log_dir) -> dict[str, dict[int, float]]:
    """What TensorBoard shows: tag -> {step: value}."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def logged(metrics_file) -> dict[str, dict[int, float]]:
    """The metrics log as the same shape: key -> {epoch: value}."""
    out = {}
    for m in map(json.loads, metrics_file.read_text().splitlines()):
        for key, value in m.items():
            if key != "epoch":
                out.setdefault(key, {})[m["epoch"]] = value
    return out


def assert_same(log_dir, metrics_file, *must_have: str) -> None:
    got, want = scalars(log_dir), logged(metrics_file)
    groups = {"accuracy", "training", "teacher"}
    assert all(t.split("/")[0] in groups for t in got), sorted(got)
    assert {t.split("/", 1)[1] for t in got} == set(want), (sorted(got), sorted(want))
    for tag, values in got.items():
        assert values == pytest.approx(want[tag.split("/", 1)[1]], rel=1e-6), tag
    assert set(must_have) <= set(got), sorted(got)


def events(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("events.out.tfevents.*"))


def test_teacher_writes_its_metrics_log_as_scalars_with_the_tta_accuracies(tmp_path, data_dir):
    tb = tmp_path / "tb"
    args = [
        "teacher",
        "--preset",
        "seed-cnn",
        "--data-dir",
        data_dir,
        "--subset",
        "300",
        "--epochs",
        "2",
        "--ema",
        "0.9",
        "--tta-eval",
        "flip,flip-translate",
        "--device",
        "cpu",
        "--out",
        tmp_path / "t.pt",
    ]
    code, err, _ = cli(*args, "--tensorboard", tb)
    assert code == 0, err
    assert len(events(tb)) == 1 and events(tb)[0].startswith("events.out.tfevents.")  # in DIR itself
    assert_same(
        tb,
        tmp_path / "t.pt.metrics.jsonl",
        "accuracy/test_acc",
        "accuracy/train_acc",
        "training/train_loss",
        "training/lr",
        "training/train_img_s",
        "accuracy/test_acc_raw",
        "accuracy/test_acc_tta_flip",
        "accuracy/test_acc_tta_flip-translate",
    )
    assert set(scalars(tb)["accuracy/test_acc"]) == {1, 2}  # the epoch is the step
    assert set(scalars(tb)["accuracy/test_acc_tta_flip"]) == {2}  # measured once, after the last epoch


def test_student_writes_agreement_and_kl_and_nothing_without_the_flag(tmp_path, data_dir, cache_file, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SummaryWriter's own default folder would be ./runs
    args = [
        "student",
        "--preset",
        "seed-cnn",
        "--cache",
        cache_file,
        "--data-dir",
        data_dir,
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    code, err, _ = cli(*args, "--out", tmp_path / "plain" / "s.pt")
    assert code == 0, err
    assert events(tmp_path) == []
    code, err, _ = cli(*args, "--out", tmp_path / "s.pt", "--tensorboard", tmp_path / "tb")
    assert code == 0, err
    assert_same(tmp_path / "tb", tmp_path / "s.pt.metrics.jsonl", "teacher/teacher_agreement", "teacher/teacher_kl")
    assert len(events(tmp_path)) == 1


@pytest.mark.e2e
def test_pipeline_gives_each_row_its_own_subfolder(tmp_path, data_dir, cpu):
    out, tb = tmp_path / "run", tmp_path / "tb"
    recipe = TINY.override(views=2, epochs=1).override_teacher(epochs=1)
    run_pipeline(recipe, preset="test", run_dir=out, data_dir=data_dir, rt=cpu, with_online=True, tensorboard=tb)
    rows = {
        "teacher": "teacher.pt",
        "student_alone": "student_alone.pt",
        "student_with_kd": "student_kd.pt",
        "student_online_kd": "student_online.pt",
    }
    assert sorted(p.name for p in tb.iterdir()) == sorted(rows)
    for row, ckpt in rows.items():
        assert len(events(tb / row)) == 1, row
        assert_same(tb / row, out / f"{ckpt}.metrics.jsonl", *(["teacher/teacher_kl"] if row != "teacher" else []))
    run_pipeline(
        recipe, preset="test", run_dir=out, data_dir=data_dir, rt=cpu, with_online=True, resume=True, tensorboard=tb
    )
    assert len(events(tb)) == 4  # kept stages train no epochs: no new event files


def test_missing_tensorboard_is_one_line_before_training(tmp_path, data_dir, cpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as if not installed
    out = tmp_path / "out"
    code, err, _ = cli(
        "teacher",
        "--preset",
        "seed-cnn",
        "--data-dir",
        data_dir,
        "--subset",
        "300",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out / "t.pt",
        "--tensorboard",
        out / "tb",
    )
    assert_one_line_error(code, err, "--tensorboard", "pip install 'kdcache[tensorboard]'")
    assert written(out) == []
    with pytest.raises(KDCacheError, match=r"pip install 'kdcache\[tensorboard\]'"):
        run_pipeline(TINY, preset="test", run_dir=out / "run", data_dir=data_dir, rt=cpu, tensorboard=out / "tb")
    assert written(out) == []


def test_the_writer_closes_when_training_fails(tmp_path):
    with pytest.raises(RuntimeError, match="diverged"), EpochScalars(tmp_path) as on_epoch:
        on_epoch({"epoch": 1, "test_acc": 0.25, "lr": 0.1})
        writer = on_epoch.writer
        raise RuntimeError("diverged")
    assert on_epoch.writer is None and writer.all_writers is None  # SummaryWriter.close() drops its writers
    assert scalars(tmp_path) == {"accuracy/test_acc": {1: 0.25}, "training/lr": {1: pytest.approx(0.1)}}
