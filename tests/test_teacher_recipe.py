"""A teacher worth distilling: the airbench-class networks, label smoothing, the weight average,
BatchNorm-bias scaling, per-step schedules, test-time augmentation in eval and in the dump, and a
preset that carries a teacher recipe beside the students'."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, run_cli

from kdcache.checkpoints import load_checkpoint, read_checkpoint
from kdcache.config import Recipe, get_preset, validate
from kdcache.dump import dump_logits
from kdcache.errors import KDCacheError
from kdcache.inference import TTAModel, predict
from kdcache.losses import label_loss, student_loss
from kdcache.models import AirNet, build
from kdcache.stages import train_teacher
from kdcache.train import WeightAverage, build_optimizer, lr_factor
from kdcache.views import CropFlip, Views, render_views

AIR = TINY.override_teacher(
    teacher_arch="airbench94",
    epochs=2,
    batch_size=50,
    optimizer="sgd",
    lr=0.4,
    momentum=0.85,
    nesterov=True,
    weight_decay=1e-3,
    schedule="linear",
    warmup_epochs=1,
    label_smoothing=0.2,
    bn_bias_lr=8.0,
    augment=True,
)


@pytest.mark.parametrize("arch", ["airbench94", "airbench95"])
def test_airbench_networks_build_train_a_step_and_whiten_their_input(arch):
    torch.manual_seed(0)
    model = build(arch, 10)
    assert isinstance(model, AirNet) and not model[0].weight.requires_grad
    images = torch.rand(64, 3, 32, 32)
    model.init_from_data(images)
    # the whitening filters decorrelate 2x2 patches: their outputs' second moments are close to the identity
    out = F.conv2d(images, model[0].weight[:12])
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    assert torch.allclose(flat @ flat.T / flat.shape[1], torch.eye(12), atol=0.05)
    opt, _ = build_optimizer(
        model, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, epochs=1, schedule="linear", steps_per_epoch=1
    )
    before = model[0].weight.clone()
    loss = F.cross_entropy(model(images), torch.randint(0, 10, (64,)))
    loss.backward()
    opt.step()
    assert torch.equal(model[0].weight, before)  # frozen whitening
    assert model(images).shape == (64, 10)


def test_label_smoothing_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, y, y2, lam = (
        torch.randn(8, 5, generator=g),
        torch.arange(8) % 5,
        (torch.arange(8) + 2) % 5,
        torch.rand(8, generator=g),
    )
    logp = s.log_softmax(1)

    def smoothed(labels):
        return -(0.8 * logp.gather(1, labels[:, None])[:, 0] + 0.2 * logp.mean(1))

    assert label_loss(s, y, smoothing=0.2) == pytest.approx(smoothed(y).mean().item(), rel=1e-6)
    mixed = (lam * smoothed(y) + (1 - lam) * smoothed(y2)).mean().item()
    assert label_loss(s, y, y2, lam, smoothing=0.2) == pytest.approx(mixed, rel=1e-6)
    assert student_loss(s, y, None, T=2.0, alpha=0.0, smoothing=0.2) == pytest.approx(
        smoothed(y).mean().item(), rel=1e-6
    )


def test_schedules_step_per_batch_and_meet_the_epoch_wise_values_at_each_epoch_start():
    assert [lr_factor("linear", e, 4, 1) for e in (0, 0.5, 1, 2.5, 4)] == pytest.approx([0.5, 0.75, 1.0, 0.5, 0.0])
    assert lr_factor("cosine", 2.0, 4) == pytest.approx(0.5)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt, sched = build_optimizer(
        net,
        optimizer="sgd",
        lr=0.2,
        momentum=0.9,
        weight_decay=1e-3,
        epochs=2,
        schedule="linear",
        steps_per_epoch=4,
        bn_bias_lr=64.0,
    )
    bias_group = next(g for g in opt.param_groups if any(p is net[1].bias for p in g["params"]))
    assert bias_group["lr"] == pytest.approx(0.2 * 64) and bias_group["weight_decay"] == pytest.approx(1e-3 / 64)
    assert all(p is not net[1].bias for g in opt.param_groups if g is not bias_group for p in g["params"])
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * (1 - i / 8) for i in range(8)])


def test_the_weight_average_follows_the_weights_with_a_warm_up():
    net = torch.nn.Linear(2, 1, bias=False)
    ema = WeightAverage(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # the first update takes the weights as they are
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)  # then decay min(0.5, 2/11): early averages forget the start quickly
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 2 / 11 * 1.0 + 9 / 11 * 3.0))
    for _ in range(30):
        ema.update(net)
    assert torch.allclose(ema.module.weight, net.weight) and ema.state_dict()["steps"] == 32


@pytest.fixture(scope="module")
def air_teachers(tmp_path_factory, data_dir, cpu):
    """The same tiny airbench94 run twice, with and without the weight average: training is the same
    (the second also measures test-time augmentation after training, which changes nothing before)."""
    root = tmp_path_factory.mktemp("air")
    raw, avg = root / "raw.pt", root / "ema.pt"
    train_teacher(AIR, data_dir=data_dir, out=raw, rt=cpu)
    train_teacher(AIR.override_teacher(ema=0.6, tta_eval="flip,flip-translate"), data_dir=data_dir, out=avg, rt=cpu)
    return raw, avg


def test_the_checkpoint_holds_the_average_and_records_tta_accuracies(air_teachers, data_dir, cpu):
    raw, avg = air_teachers
    raw_model, raw_meta = load_checkpoint(raw)
    avg_model, avg_meta = load_checkpoint(avg)
    raw_w, avg_w = raw_model.state_dict(), avg_model.state_dict()
    assert any(not torch.equal(raw_w[k], avg_w[k]) for k in raw_w if raw_w[k].is_floating_point())
    from kdcache.data import load_dataset
    from kdcache.inference import accuracy

    data = load_dataset("cifar10", data_dir, 400)
    acc = lambda m, meta: accuracy(
        predict(m, data.test_x, meta["normalize_mean"], meta["normalize_std"], cpu), data.test_y
    )  # noqa: E731
    assert acc(avg_model, avg_meta) == pytest.approx(avg_meta["metrics"]["test_acc"])
    from kdcache.artifacts import metrics_path, read_metrics

    last = read_metrics(metrics_path(avg))[-1]
    assert last["test_acc_raw"] == pytest.approx(acc(raw_model, raw_meta))  # the raw weights are the no-EMA run's
    assert {"test_acc_tta_flip", "test_acc_tta_flip-translate"} <= set(avg_meta["metrics"])  # asked for
    assert {"test_acc_tta_flip", "test_acc_tta_flip-translate"} <= set(last)  # and in the metrics log
    assert not any(k.startswith("test_acc_tta") for k in raw_meta["metrics"])  # not asked for: not measured
    assert raw_meta["recipe"]["teacher"]["label_smoothing"] == 0.2


def test_tta_flip_cache_holds_the_mean_of_the_view_and_its_mirror(air_teachers, data_dir, cpu, tmp_path):
    _, teacher = air_teachers
    out = tmp_path / "tta.h5"
    dump_logits(
        teacher_path=teacher,
        data_dir=data_dir,
        out=out,
        views=2,
        seed=3,
        batch_size=64,
        rt=cpu,
        subset=100,
        augment=True,
        tta="flip",
    )
    with h5py.File(out, "r") as f:
        cached, params = torch.from_numpy(f["logits"][...]).float(), torch.from_numpy(f["view_params"][...])
        assert f.attrs["tta"] == "flip"
    model, meta = load_checkpoint(teacher)
    from kdcache.data import load_dataset

    data = load_dataset("cifar10", data_dir, 100)
    rows = torch.arange(100).repeat_interleave(2)
    x = render_views(
        data.train_x, rows, Views(CropFlip(), params.flatten(0, 1)), meta["normalize_mean"], meta["normalize_std"]
    )
    with torch.no_grad():
        want = 0.5 * (model(x) + model(x.flip(-1)))
    assert torch.allclose(cached.flatten(0, 1), want.half().float(), atol=2e-3)
    verified = run_cli("verify", str(out), "--teacher", str(teacher), "--data-dir", str(data_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_tta_levels_are_checked(tmp_path, teacher_ckpt, data_dir):
    bad = run_cli("eval", str(teacher_ckpt), "--data-dir", str(data_dir), "--tta", "rotate")
    assert bad.returncode == 2 and "--tta must be one of none, flip, flip-translate" in bad.stderr
    good = run_cli("eval", str(teacher_ckpt), "--data-dir", str(data_dir), "--tta", "flip-translate")
    assert good.returncode == 0 and "tta flip-translate" in good.stdout
    model = torch.nn.Conv2d(3, 2, 32)
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(TTAModel(model, "flip")(x), 0.5 * (model(x) + model(x.flip(-1))))


def test_a_teacher_measures_test_time_augmentation_only_when_asked(tmp_path, teacher_ckpt, data_dir):
    """No TTA passes by default; --tta-eval LEVELS (or the config file's [teacher] tta_eval) measures them after
    training, into the checkpoint's metrics and the summary; a bad list is one line naming the flag."""
    assert not any(k.startswith("test_acc_tta") for k in read_checkpoint(teacher_ckpt)["metrics"])
    base = ["teacher", "--preset", "seed-cnn", "--data-dir", str(data_dir), "--subset", "100", "--epochs", "1"]
    asked = run_cli(*base, "--tta-eval", "flip", "--device", "cpu", "--out", str(tmp_path / "t.pt"))
    assert asked.returncode == 0, asked.stderr
    assert "evaluating with test-time augmentation (flip: 2 passes" in asked.stderr
    assert "with tta flip" in asked.stdout and "flip-translate" not in asked.stdout
    meta = read_checkpoint(tmp_path / "t.pt")
    assert {k for k in meta["metrics"] if k.startswith("test_acc_tta")} == {"test_acc_tta_flip"}
    assert meta["recipe"]["teacher"]["tta_eval"] == "flip"  # recorded: `inspect --config` repeats it
    config = tmp_path / "t.toml"
    config.write_text('preset = "seed-cnn"\n[teacher]\ntta_eval = "flip-translate"\n')
    printed = run_cli("teacher", "--config", str(config), "--print-config")
    assert printed.returncode == 0 and 'tta_eval = "flip-translate"' in printed.stdout, printed.stderr
    for flag, where in ((["--tta-eval", "flip,rotate"], "--tta-eval"), (["--config", str(config)], "tta_eval")):
        if flag[0] == "--config":
            config.write_text('[teacher]\ntta_eval = "flip,flip"\n')
        bad = run_cli(*base, *flag, "--device", "cpu", "--out", str(tmp_path / "bad.pt"))
        assert bad.returncode == 2 and f"{where} must be none or a comma list of flip, flip-translate" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.pt").exists()


def test_a_preset_carries_a_teacher_recipe_and_the_students_keep_theirs(tmp_path):
    fast = get_preset("cifar10-fast")
    teacher = fast.for_teacher()
    assert (teacher.teacher_arch, teacher.lr, teacher.batch_size, teacher.ema) == ("airbench94", 1.5, 1024, 0.98)
    assert (fast.lr, fast.batch_size, fast.ema, fast.student_arch) == (0.2, 512, 0.0, "resnet18")
    typed = fast.override_teacher(lr=0.5, epochs=5, seed=4)
    assert typed.for_teacher().lr == 0.5 and typed.for_teacher().epochs == 5 and typed.seed == 4 and typed.lr == 0.2
    with pytest.raises(KDCacheError, match="--warmup-epochs must be in 0..2"):  # a recipe is checked when made
        fast.override_teacher(epochs=3)  # below the teacher's 3 warm-up epochs
    again = Recipe.from_dict(dataclasses.asdict(typed))  # as a checkpoint or cache records it
    assert again == typed
    with pytest.raises(KDCacheError, match="--ema must be a decay"):
        validate(fast.override_teacher(ema=1.5))
    with pytest.raises(KDCacheError, match="unknown fields"):
        validate(dataclasses.replace(fast, teacher={"lrate": 1.0}))


def test_a_student_after_a_fast_teacher_keeps_the_student_recipe(air_teachers, data_dir, tmp_path):
    raw, _ = air_teachers
    recorded = read_checkpoint(raw)["recipe"]
    assert recorded["lr"] == TINY.lr and recorded["teacher"]["lr"] == 0.4  # students' lr, and the teacher's own
    out = tmp_path / "cache.h5"
    dumped = run_cli(
        "dump-logits",
        "--teacher",
        str(raw),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--views",
        "1",
        "--no-augment",
    )
    assert dumped.returncode == 0, dumped.stderr
    with h5py.File(out, "r") as f:
        import json

        assert json.loads(f.attrs["recipe"])["lr"] == TINY.lr
    assert np.isfinite(h5py.File(out, "r")["logits"][...]).all()


def test_the_guard_speaks_when_the_teacher_is_no_better_than_the_student(cache_file, data_dir, tmp_path):
    from kdcache.guard import weak_teacher

    assert weak_teacher(0.95, 0.90, "the student alone") is None
    line = weak_teacher(0.9162, 0.9370, "the student alone")
    assert "91.62%" in line and "93.70%" in line and "cifar10-fast" in line and "\n" not in line
    weak = tmp_path / "weak.h5"
    weak.write_bytes(cache_file.read_bytes())
    with h5py.File(weak, "a") as f:  # a teacher that gets nothing right
        f.attrs["teacher_test_acc"] = 0.0
    out = run_cli(
        "student",
        "--preset",
        "seed-cnn",
        "--cache",
        str(weak),
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "s.pt"),
    )
    assert out.returncode == 0, out.stderr
    assert "warning: the teacher (0.00% test accuracy) is not better than this student" in out.stderr
    fine = run_cli(
        "student",
        "--preset",
        "seed-cnn",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "s2.pt"),
    )
    assert fine.returncode == 0 and ("warning: the teacher" in fine.stderr) == (
        h5py.File(cache_file, "r").attrs["teacher_test_acc"]
        <= torch.load(tmp_path / "s2.pt", weights_only=True)["metrics"]["test_acc"]
    )


@pytest.mark.e2e
def test_pipeline_trains_an_ensemble_of_teachers_and_reports_each(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "pipeline",
        "--preset",
        "seed-cnn",
        "--subset",
        "200",
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--teachers",
        "2",
        "--tta-eval",
        "flip",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    a, b = read_checkpoint(out / "teacher.pt"), read_checkpoint(out / "teacher_2.pt")
    assert (a["recipe"]["seed"], b["recipe"]["seed"]) == (0, 1)
    with h5py.File(out / "teacher_logits.h5", "r") as f:
        import json

        members = json.loads(f.attrs["ensemble_members"])
        assert [m["path"] for m in members] == [str(out / "teacher.pt"), str(out / "teacher_2.pt")]
        ensemble_acc = float(f.attrs["teacher_test_acc"])
    report = json.loads((out / "report.json").read_text())
    models = [r["model"] for r in report["rows"]]
    assert (
        models[:3] == ["teacher", "teacher 2", "teacher ensemble (2)"] and report["ensemble_test_acc"] == ensemble_acc
    )
    assert "teacher ensemble (2)" in done.stdout
    # --tta-eval: each member teacher measures it, into its checkpoint and the report; the students never do
    assert report["rows"][1]["test_acc_tta_flip"] == b["metrics"]["test_acc_tta_flip"]
    assert not any(k.startswith("test_acc_tta") for r in report["rows"][3:] for k in r)
    assert "Teacher with test-time augmentation: flip" in done.stdout
    assert "Teacher 2 with test-time augmentation: flip" in (out / "report.md").read_text()
    again = run_cli(*args, "--resume")  # every stage kept
    assert again.returncode == 0 and again.stderr.count("kept") >= 5, again.stderr
    bad = run_cli(
        "pipeline", "--teachers", "2", "--with-online", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2 and "--with-online takes one teacher" in bad.stderr


@pytest.mark.e2e
def test_pipeline_reports_a_reused_imported_teacher_that_has_no_metrics(teacher_ckpt, data_dir, tmp_path):
    weights = tmp_path / "sd.pt"
    torch.save(torch.load(teacher_ckpt, weights_only=True)["state_dict"], weights)
    imported = tmp_path / "imported.pt"
    done = run_cli(
        "import-teacher",
        str(weights),
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        str(data_dir),
        "--out",
        str(imported),
    )
    assert done.returncode == 0, done.stderr
    run = run_cli(
        "pipeline",
        "--preset",
        "seed-cnn",
        "--teacher",
        str(imported),
        "--subset",
        "200",
        "--epochs",
        "1",
        "--views",
        "1",
        "--no-augment",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
    )
    assert run.returncode == 0, run.stderr
    import json

    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert rows[0]["model"] == "teacher" and rows[0]["epochs"] == 0
    assert rows[0]["test_acc"] == read_checkpoint(imported)["metrics"]["test_acc"]
