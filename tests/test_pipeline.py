"""Presets are the notebooks' recipes; the pipeline compares teacher, student alone and KD student."""

import json
import os
import shutil

import h5py
import pytest
import torch
from helpers import TINY, assert_one_line_error, cli
from typer.testing import CliRunner

from kdcache.checkpoints import file_sha256, load_checkpoint
from kdcache.cli import app
from kdcache.config import PRESETS, DumpSettings, get_preset
from kdcache.errors import KDCacheError
from kdcache.pipeline import run_pipeline


def test_seed_resnet_preset_is_notebook_one():
    p = get_preset("seed-resnet")
    assert (p.teacher_arch, p.student_arch, p.optimizer, p.lr, p.momentum, p.weight_decay) == (
        "resnet50",
        "resnet18",
        "sgd",
        0.1,
        0.9,
        5e-4,
    )
    assert (p.schedule, p.epochs, p.batch_size, p.augment, p.T, p.alpha, p.views) == (
        "cosine",
        200,
        128,
        True,
        3.0,
        0.5,
        8,
    )
    assert p.mean == (0.4914, 0.4822, 0.4465) and p.std == (0.2023, 0.1994, 0.2010)


def test_seed_cnn_preset_is_notebook_two():
    p = get_preset("seed-cnn")
    assert (p.teacher_arch, p.student_arch, p.optimizer, p.lr, p.epochs, p.batch_size) == (
        "seed-cnn-teacher",
        "seed-cnn-student",
        "adam",
        1e-3,
        10,
        64,
    )
    assert (p.augment, p.views, p.T, p.alpha, p.schedule) == (False, 1, 2.0, 0.25, "constant")
    assert p.mean == (0.456, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)


def test_demo_preset_uses_a_subset_and_small_models():
    p = PRESETS["demo"]
    assert p.subset and p.subset <= 10000 and p.teacher_arch == "resnet9s" and p.student_arch == "seed-cnn-student"
    assert p.for_teacher().augment and not p.augment and p.views == 1  # teacher trains on crops, labels plain images


def test_flags_override_the_preset_field_by_field():
    p = get_preset("seed-cnn").override(epochs=3, T=None)
    assert p.epochs == 3 and p.T == 2.0


def test_several_views_mean_augmented_views_unless_said_otherwise():
    assert get_preset("seed-cnn").override(views=8).augment is True
    assert get_preset("seed-cnn").override(views=8, augment=False).augment is False
    assert get_preset("seed-cnn").override(views=1).augment is False


def test_unknown_preset_is_a_user_error():
    with pytest.raises(KDCacheError, match="unknown preset"):
        get_preset("nope")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir, cpu):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_pipeline(TINY.override(views=2, augment=True), preset="test", run_dir=out, data_dir=data_dir, rt=cpu)
    return out


@pytest.mark.e2e
def test_pipeline_writes_every_artifact_and_report(run_dir):
    for name in (
        "teacher.pt",
        "teacher_logits.h5",
        "student_kd.pt",
        "student_alone.pt",
        "report.json",
        "report.md",
        "accuracy.png",
    ):
        assert (run_dir / name).exists(), name
    record = json.loads((run_dir / "report.json").read_text())
    assert [r["model"] for r in record["rows"]] == ["teacher", "student alone", "student with KD"]
    by = {r["model"]: r for r in record["rows"]}
    assert by["student alone"]["alpha"] == 0.0 and by["student with KD"]["alpha"] == TINY.alpha
    assert by["student alone"]["epochs"] == by["student with KD"]["epochs"] == TINY.epochs
    assert record["kd_gain"] == pytest.approx(by["student with KD"]["test_acc"] - by["student alone"]["test_acc"])
    assert record["run"]["preset"] == "test"
    assert "| student with KD | seed-cnn-student | 267,738 |" in (run_dir / "report.md").read_text()


@pytest.mark.e2e
def test_plot_is_a_valid_png(run_dir):
    from PIL import Image

    data = (run_dir / "accuracy.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(run_dir / "accuracy.png") as img:
        img.verify()
        assert img.size[0] > 300 and img.size[1] > 200


@pytest.mark.e2e
def test_plot_has_accuracy_per_epoch_and_per_second_each_row_in_its_own_colour(run_dir):
    import itertools

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from kdcache.report import figure, load_run, plot_curves

    record = load_run(run_dir)
    history = [json.loads(line) for line in (run_dir / "student_kd.pt.metrics.jsonl").read_text().splitlines()]
    assert record["times"]["student with KD"] == list(itertools.accumulate(m["train_time_s"] for m in history))
    online = {
        **record,
        "curves": {**record["curves"], "student, online KD": [0.3, 0.4]},
        "times": {**record["times"], "student, online KD": [7.0, 14.0]},
    }
    curves = plot_curves([online])
    assert [c["label"] for c in curves] == ["teacher", "student alone", "student with KD", "student, online KD"]
    assert len({c["color"] for c in curves}) == 4  # the teacher's blue is not the online student's any more
    assert len({c["marker"] for c in curves}) == 4  # a curve hidden under another still shows its markers
    fig = figure([online])
    try:
        by_epoch, by_time = fig.axes
        for ax in (by_epoch, by_time):  # the same colour for a row in both panels
            assert [to_hex(line.get_color()) for line in ax.get_lines()] == [c["color"] for c in curves]
        assert [list(line.get_xdata()) for line in by_time.get_lines()] == [c["time_s"] for c in curves]
        assert [list(line.get_xdata()) for line in by_epoch.get_lines()][-1] == [1, 2]
        assert by_epoch.get_xlabel() == "epoch" and by_time.get_xlabel().startswith("cumulative training time (s")
        assert by_epoch.get_ylabel() == by_time.get_ylabel() == "test accuracy (%)"
        assert len(fig.legends) == 1 and by_epoch.get_legend() is None and by_time.get_legend() is None
    finally:
        plt.close(fig)
    two = plot_curves([online, record])  # several runs: a model keeps its colour, a run its line style
    assert [c["color"] for c in two[4:]] == [c["color"] for c in curves[:3]]
    assert {c["linestyle"] for c in two[:4]} != {c["linestyle"] for c in two[4:]}


@pytest.mark.e2e
def test_report_rerenders_from_saved_metrics(run_dir, tmp_path):
    for name in ("report.md", "accuracy.png"):
        (run_dir / name).unlink()
    r = CliRunner().invoke(
        app, ["report", str(run_dir), str(run_dir), "--plot", str(tmp_path / "both.png")], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert (run_dir / "report.md").exists() and (run_dir / "accuracy.png").exists()
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line for line in r.output.splitlines() if "student with KD" in line and "267,738" in line]
    assert len(rows) == 2  # one per run, side by side


@pytest.mark.e2e
def test_resume_keeps_finished_stages_and_refuses_silent_overwrite(run_dir, data_dir, cpu):
    recipe = TINY.override(views=2, augment=True)
    with pytest.raises(KDCacheError, match="already holds a run"):
        run_pipeline(recipe, preset="test", run_dir=run_dir, data_dir=data_dir, rt=cpu)
    stamps = {p.name: os.stat(p).st_mtime_ns for p in run_dir.glob("*.pt")}
    run_pipeline(recipe, preset="test", run_dir=run_dir, data_dir=data_dir, rt=cpu, resume=True)
    assert stamps == {p.name: os.stat(p).st_mtime_ns for p in run_dir.glob("*.pt")}


@pytest.mark.e2e
def test_resume_refuses_finished_stages_made_with_other_settings(run_dir, data_dir, cpu):
    changed = TINY.override(views=2, augment=True, alpha=0.9)
    with pytest.raises(KDCacheError, match=r"student_kd.pt was made with alpha=0.25, this run asks for 0.9"):
        run_pipeline(changed, preset="test", run_dir=run_dir, data_dir=data_dir, rt=cpu, resume=True)
    with pytest.raises(KDCacheError, match=r"teacher.pt was made with schedule='constant', this run asks for 'cosine'"):
        run_pipeline(
            TINY.override(views=2, augment=True, schedule="cosine"),
            preset="test",
            run_dir=run_dir,
            data_dir=data_dir,
            rt=cpu,
            resume=True,
        )
    with pytest.raises(KDCacheError, match=r"student_kd.pt was made with lr=0.001, this run asks for 0.002"):
        run_pipeline(
            TINY.override(views=2, augment=True, lr=0.002),
            preset="test",
            run_dir=run_dir,
            data_dir=data_dir,
            rt=cpu,
            teacher=run_dir / "teacher.pt",
            resume=True,
        )
    with pytest.raises(KDCacheError, match="num_views"):
        run_pipeline(
            TINY.override(views=3, augment=True), preset="test", run_dir=run_dir, data_dir=data_dir, rt=cpu, resume=True
        )
    with pytest.raises(KDCacheError, match=r"was made with tta='none', this run asks for 'flip'"):  # a [dump] table
        run_pipeline(
            TINY.override(views=2, augment=True),
            preset="test",
            run_dir=run_dir,
            data_dir=data_dir,
            rt=cpu,
            resume=True,
            dump=DumpSettings(tta="flip"),
        )


@pytest.mark.e2e
def test_resume_keeps_stages_whose_recipe_predates_newer_fields(run_dir, data_dir, cpu, tmp_path):
    """A checkpoint written before a recipe field existed counts as made with that field's default."""
    old_run = tmp_path / "old"
    shutil.copytree(run_dir, old_run)
    for name in ("student_kd.pt", "student_alone.pt"):  # not the teacher: the cache records its sha256
        record = torch.load(old_run / name, weights_only=True)
        del record["recipe"]["warmup_epochs"], record["recipe"]["nesterov"]
        torch.save(record, old_run / name)
    stamps = {p.name: os.stat(p).st_mtime_ns for p in old_run.glob("*.pt")}
    run_pipeline(
        TINY.override(views=2, augment=True), preset="test", run_dir=old_run, data_dir=data_dir, rt=cpu, resume=True
    )
    assert stamps == {p.name: os.stat(p).st_mtime_ns for p in old_run.glob("*.pt")}


@pytest.mark.e2e
def test_with_online_adds_the_online_kd_row_beside_the_cached_one(tmp_path, data_dir, cpu):
    out = tmp_path / "online"
    recipe = TINY.override(views=2, mix="cutmix", mix_prob=0.5, epochs=1).override_teacher(epochs=1)
    record = run_pipeline(recipe, preset="test", run_dir=out, data_dir=data_dir, rt=cpu, with_online=True)
    by = {r["model"]: r for r in record["rows"]}
    assert list(by) == ["teacher", "student alone", "student with KD", "student, online KD"]
    assert load_checkpoint(out / "student_online.pt")[1]["online_teacher_sha256"] == file_sha256(out / "teacher.pt")
    assert 0.0 <= by["student, online KD"]["teacher_agreement"] <= 1.0
    with h5py.File(out / "teacher_logits.h5", "r") as f:
        assert f.attrs["mix"] == "cutmix" and "mix_partner" in f
    assert "online KD" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_resume_refuses_students_made_with_another_loss(run_dir, data_dir, cpu):
    with pytest.raises(KDCacheError, match=r"student_kd.pt was made with loss='kd', this run asks for 'dkd'"):
        run_pipeline(
            TINY.override(views=2, augment=True, loss="dkd"),
            preset="test",
            run_dir=run_dir,
            data_dir=data_dir,
            rt=cpu,
            resume=True,
        )


@pytest.mark.e2e
def test_teacher_can_train_on_crops_while_cache_and_students_see_plain_views(tmp_path, data_dir, cpu):
    from kdcache.checkpoints import read_checkpoint
    from kdcache.config import Recipe

    out = tmp_path / "teacher-augment"
    recipe = TINY.override(augment=False, epochs=1).override_teacher(augment=True, epochs=1)
    run_pipeline(recipe, preset="test", run_dir=out, data_dir=data_dir, rt=cpu)
    recorded = Recipe.from_dict(read_checkpoint(out / "teacher.pt")["recipe"])  # the whole recipe, students' too
    assert recorded.for_teacher().augment is True and recorded.augment is False  # what the teacher really trained on
    with h5py.File(out / "teacher_logits.h5", "r") as f:
        assert not f.attrs["augment"] and f["view_params"][:, :, :2].max() == 4  # the plain view: offset 4 = no shift
    stamp = (out / "teacher.pt").stat().st_mtime_ns
    run_pipeline(recipe, preset="test", run_dir=out, data_dir=data_dir, rt=cpu, resume=True)  # all kept
    assert (out / "teacher.pt").stat().st_mtime_ns == stamp
    with pytest.raises(KDCacheError, match="teacher.pt was made with augment=True, this run asks for False"):
        run_pipeline(
            recipe.override_teacher(augment=False), preset="test", run_dir=out, data_dir=data_dir, rt=cpu, resume=True
        )


# ---- nothing overwritten unasked --------------------------------------------------------------------


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.e2e
def test_pipeline_never_replaces_a_runs_teacher_unasked(run_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    other = tmp_path / "other.pt"  # another teacher: a readable checkpoint, other bytes
    record = torch.load(run / "teacher.pt", weights_only=True)
    record["metrics"]["test_acc"] = 0.5
    torch.save(record, other)
    before = _snapshot(run)
    args = [
        "pipeline",
        "--preset",
        "seed-cnn",
        "--data-dir",
        data_dir,
        "--out",
        run,
        "--teacher",
        other,
        "--device",
        "cpu",
    ]
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, "teacher.pt is another teacher than", "--force", "choose another --out")
    code, err, _ = cli(*args, "--resume")  # refused up front, before the teacher is copied in
    assert_one_line_error(code, err, "teacher.pt is another teacher than", "leave --teacher out")
    assert _snapshot(run) == before
    (run / "teacher.pt").unlink()  # a run that lost its teacher: resumed only with the one its cache was dumped from
    code, err, _ = cli(*args, "--resume")
    assert_one_line_error(code, err, "teacher_logits.h5 was made with teacher_sha256=")
    assert not (run / "teacher.pt").exists()


@pytest.mark.e2e
def test_report_never_overwrites_a_plot_unasked_nor_writes_through_a_link(run_dir, tmp_path):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my figure\n")
    stamp = (run_dir / "report.json").stat().st_mtime_ns
    code, err, _ = cli("report", run_dir, "--plot", mine)
    assert_one_line_error(code, err, "mine.png already exists", "--force", "another --plot")
    assert mine.read_bytes() == b"my figure\n" and (run_dir / "report.json").stat().st_mtime_ns == stamp
    victim, link = tmp_path / "victim.png", tmp_path / "link.png"
    victim.write_bytes(b"not yours\n")
    link.symlink_to(victim)
    code, err, _ = cli("report", run_dir, "--plot", link, "--force")
    assert code == 0, err
    assert victim.read_bytes() == b"not yours\n" and not link.is_symlink() and link.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_report_reads_runs_whose_metrics_have_the_old_names(run_dir, tmp_path):
    """kdcache 0.1 named a checkpoint's metrics STEM.metrics.jsonl; such runs still report."""
    run = tmp_path / "old"
    shutil.copytree(run_dir, run)
    for name in ("teacher", "student_kd", "student_alone"):
        (run / f"{name}.pt.metrics.jsonl").rename(run / f"{name}.metrics.jsonl")
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "report.json").read_text())["rows"][0]["epochs"] == TINY.for_teacher().epochs
