"""kdcache sweep: many students from one cache in one pass.

The contract: a loop-backend student is `kdcache student` with the same settings, bit for bit on a CPU;
the stacked backend matches the loop one within float tolerance (BatchNorm statistics included);
students of one seed see the very same batches; held-out images never reach a training batch; the
pick is made on them, not on test; the table's statistics are the textbook ones; a killed sweep
resumes to the same students; a diverging student stops alone; bad axes are one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import assert_one_line_error, cli

from kdcache.checkpoints import load_checkpoint
from kdcache.errors import KDCacheError
from kdcache.stages import student_recipe, train_student
from kdcache.sweeps import SweepSpec, parse_seeds, pick, run_sweep, summary, table, val_rows

BN_NET = "byo_models:make_bn_net"  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def base(cache_file):
    return student_recipe(cache_file, None, {}, {"student_arch": "seed-cnn-student", "epochs": 2})


def _sweep(base, cache_file, data_dir, out, cpu, resume=False, **spec):
    spec = {"T": (2.0,), "alpha": (0.5,), "seeds": (0,), "val_fraction": 0.0, "backend": "loop", "keep": "all"} | spec
    return run_sweep(
        base,
        SweepSpec(**spec),
        cache_file=cache_file,
        data_dir=data_dir,
        out=out,
        rt=cpu,
        force=not resume,
        resume=resume,
    )


def _weights(path):
    return load_checkpoint(path, trust_arch=True)[0].state_dict()


def test_loop_students_equal_kdcache_student_bit_for_bit(base, cache_file, data_dir, cpu, tmp_path):
    """Dropout included (the seed-cnn student has it): each member keeps its own random stream."""
    result = _sweep(base, cache_file, data_dir, tmp_path / "sweep", cpu)
    names = {s["setting"]["label"]: s["name"] for s in result.record["students"]}
    assert set(names) == {"alone", "kd T=2 alpha=0.5", "kd T=3 alpha=0.5"}  # the baseline and design card added
    for label, (T, alpha) in {"alone": (base.T, 0.0), "kd T=2 alpha=0.5": (2.0, 0.5)}.items():
        alone = train_student(
            dataclasses.replace(base, T=T, alpha=alpha, seed=0),
            cache_file=cache_file,
            data_dir=data_dir,
            out=tmp_path / f"{label}.pt",
            rt=cpu,
        )
        ours = _weights(tmp_path / "sweep" / "students" / f"{names[label]}.pt")
        theirs = _weights(alone.out)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), label
        final = next(s for s in result.record["students"] if s["setting"]["label"] == label)["final"]
        assert final["test_acc"] == alone.test_acc


def test_stacked_backend_equals_loop_within_tolerance(base, cache_file, data_dir, cpu, tmp_path):
    # SGD: a float-rounding difference stays that small (Adam divides it by a near-zero gradient norm)
    bn = dataclasses.replace(base, student_arch=BN_NET, optimizer="sgd", lr=0.05, momentum=0.9)
    spec = {"arch": (BN_NET,), "T": (1.0, 4.0), "alpha": (0.9,)}
    loop = _sweep(bn, cache_file, data_dir, tmp_path / "loop", cpu, **spec)
    stacked = _sweep(bn, cache_file, data_dir, tmp_path / "stacked", cpu, backend="stacked", **spec)
    assert stacked.record["backend"] == "stacked"
    for a, b in zip(loop.record["students"], stacked.record["students"], strict=True):
        assert a["name"] == b["name"]
        wa = _weights(tmp_path / "loop" / "students" / f"{a['name']}.pt")
        wb = _weights(tmp_path / "stacked" / "students" / f"{b['name']}.pt")
        assert {k for k in wa if "running" in k}, "BatchNorm running statistics are compared too"
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4, rtol=1e-3), (a["name"], k)
        assert abs(a["final"]["train_loss"] - b["final"]["train_loss"]) < 1e-4


def _recording(monkeypatch):
    """Patch the sweep's loss so every student's batches are recorded: {id(loss fn): [batch rows]}."""
    import kdcache.sweeps as sweep

    seen: dict[int, list] = {}
    real = sweep.student_loss_fn

    def recording(recipe):
        inner, rows = real(recipe), []
        seen[(recipe.T, recipe.alpha, recipe.seed)] = rows

        def loss(s, b):
            rows.append(b.index.tolist())
            return inner(s, b)

        return loss

    monkeypatch.setattr(sweep, "student_loss_fn", recording)
    return seen


def test_students_of_one_seed_see_identical_batches(base, cache_file, data_dir, cpu, tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    _sweep(base, cache_file, data_dir, tmp_path / "s", cpu, T=(1.0, 4.0), seeds=(0, 1), keep="best")
    by_seed = {seed: [rows for (_, _, s), rows in seen.items() if s == seed] for seed in (0, 1)}
    for runs in by_seed.values():
        assert len(runs) == 4 and all(r == runs[0] for r in runs)  # alone, T=1, T=4, the design card
    assert by_seed[0][0] != by_seed[1][0]  # another seed, another order


def test_held_out_images_never_reach_a_training_batch(base, cache_file, data_dir, cpu, tmp_path, monkeypatch):
    seen = _recording(monkeypatch)
    result = _sweep(base, cache_file, data_dir, tmp_path / "s", cpu, val_fraction=0.25, keep="best")
    n = 400
    held = val_rows(n, 0.25)
    assert len(held) == 100 and result.record["data"]["val_images"] == 100
    assert result.record["data"]["train_images"] == 300 and result.record["pick_on"] == "val"
    # the students' rows are numbered within the 300 kept images: every one of them, nothing else
    rows = {r for batches in seen.values() for batch in batches for r in batch}
    assert rows == set(range(300))
    from kdcache.data import load_dataset

    data = load_dataset("cifar10", data_dir, n)
    kept = torch.tensor(sorted(set(range(n)) - set(held.tolist())))
    held_images = {bytes(x.numpy().tobytes()) for x in data.train_x[torch.from_numpy(held)]}
    assert not held_images & {bytes(x.numpy().tobytes()) for x in data.train_x[kept]}
    assert all("val_acc" in s["final"] for s in result.record["students"])


def _student(key, seed, val, test, alpha=0.5):
    setting = {"key": key, "label": key, "arch": "a", "T": 1.0, "alpha": alpha, "loss": "kd"}
    return {"setting": setting, "seed": seed, "final": {"val_acc": val, "test_acc": test}, "step_time_s": 1.0}


def test_the_pick_uses_validation_not_test():
    students = [
        *(_student("alone", s, 0.60, 0.60, alpha=0) for s in range(3)),
        *(_student("A", s, 0.70, 0.61) for s in range(3)),  # best on validation
        *(_student("B", s, 0.65, 0.69) for s in range(3)),  # best on test
    ]
    assert pick(table(students, "val"), "val")["key"] == "A"
    assert pick(table(students, "test"), "test")["key"] == "B"


def test_table_statistics_match_a_hand_computation():
    s = summary([0.70, 0.72, 0.77])
    mean, std = 0.73, math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2)
    assert s["n"] == 3 and s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    half = 4.303 * std / math.sqrt(3)  # Student's t, 2 degrees of freedom, two-sided 95%
    assert s["ci95"] == pytest.approx([mean - half, mean + half])
    students = [_student("alone", i, 0.60, v, alpha=0) for i, v in enumerate((0.60, 0.62, 0.61))]
    students += [_student("kd", i, 0.6, v) for i, v in enumerate((0.63, 0.62, 0.66))]
    row = next(r for r in table(students, "test") if r["key"] == "kd")
    assert row["gain"]["mean"] == pytest.approx((0.03 + 0.0 + 0.05) / 3)  # paired: seed by seed
    assert row["within_noise"] is True  # gains 3, 0, 5 points: the interval covers 0
    one = summary([0.5])
    assert one["std"] is None and one["ci95"] is None


def test_a_killed_sweep_resumes_to_the_same_students(base, cache_file, data_dir, cpu, tmp_path, monkeypatch):
    import kdcache.sweeps as sweep

    spec = {"T": (1.0,), "seeds": (0, 1)}
    whole = _sweep(base, cache_file, data_dir, tmp_path / "whole", cpu, **spec)
    real, saves = sweep.atomic_torch_save, []

    def dies(obj, path):
        real(obj, path)
        saves.append(path)
        if len(saves) == 4:  # seed 0's two epochs and its end saved, then seed 1's first epoch: killed mid-seed
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "atomic_torch_save", dies)
    with pytest.raises(KeyboardInterrupt):
        _sweep(base, cache_file, data_dir, tmp_path / "killed", cpu, **spec)
    monkeypatch.setattr(sweep, "atomic_torch_save", real)
    assert (tmp_path / "killed" / "sweep.resume").exists() and not (tmp_path / "killed" / "sweep.json").exists()
    with pytest.raises(
        KDCacheError,
        match="started with backend='loop', this run has 'stacked': resume with --backend loop \\(or auto\\)",
    ):
        _sweep(base, cache_file, data_dir, tmp_path / "killed", cpu, resume=True, backend="stacked", **spec)
    resumed = _sweep(base, cache_file, data_dir, tmp_path / "killed", cpu, resume=True, **spec)
    assert not (tmp_path / "killed" / "sweep.resume").exists()
    for a, b in zip(whole.record["students"], resumed.record["students"], strict=True):
        wa, wb = (_weights(tmp_path / d / "students" / f"{a['name']}.pt") for d in ("whole", "killed"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a["name"]
        timing = ("train_time_s", "train_img_s", "step_time_s")
        assert {k: v for k, v in a["final"].items() if k not in timing} == {
            k: v for k, v in b["final"].items() if k not in timing
        }


def test_a_disk_too_small_for_the_students_and_resume_state_is_refused_before_training(
    base, cache_file, data_dir, cpu, tmp_path, monkeypatch
):
    import shutil

    import kdcache.sweeps as sweep

    per = 4 * sum(p.numel() for p in sweep.new_model(base.student_arch, _Sized(), 0, sweep._NoBatches()).parameters())
    # 2 seeds x 3 students: their 6 checkpoints fit, the resume state of one seed's 3 (x 4 copies, x 2) does not
    free = int(per * 7.5)
    monkeypatch.setattr(sweep.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    trained = []
    monkeypatch.setattr(sweep, "fit", lambda *a, **k: trained.append(1))
    with pytest.raises(KDCacheError, match=r"MB free, the sweep's 6 student checkpoints and its resume state need"):
        _sweep(base, cache_file, data_dir, tmp_path / "s", cpu, seeds=(0, 1))
    assert not trained


class _Sized:
    num_classes, geometry = 10, type("G", (), {"size": (32, 32)})


def test_a_diverging_student_stops_alone(base, cache_file, data_dir, cpu, tmp_path, monkeypatch):
    import kdcache.sweeps as sweep

    real = sweep.student_loss_fn

    def poisoned(recipe):
        inner = real(recipe)
        return (lambda s, b: inner(s, b) * float("nan")) if recipe.T == 4.0 else inner

    monkeypatch.setattr(sweep, "student_loss_fn", poisoned)
    result = _sweep(base, cache_file, data_dir, tmp_path / "s", cpu, T=(1.0, 4.0), keep="best")
    by_label = {s["setting"]["label"]: s for s in result.record["students"]}
    assert by_label["kd T=4 alpha=0.5"]["diverged"] and by_label["kd T=4 alpha=0.5"]["final"] is None
    assert all(s["final"] is not None for label, s in by_label.items() if label != "kd T=4 alpha=0.5")
    row = next(r for r in result.record["table"] if r["setting"]["T"] == 4.0 and r["setting"]["alpha"] > 0)
    assert row["diverged"] == [0] and row["test"]["n"] == 0
    assert (tmp_path / "s" / "best.pt").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--T", "0"], "--T 0"),
        (["--T", "1,,2"], "empty item"),
        (["--alpha", "1.5"], "--alpha 1.5"),
        (["--alpha", ""], "--alpha is empty"),
        (["--loss", "kd,nope"], "'nope' is not a loss"),
        (["--arch", "no-such-net"], "no-such-net"),
        (["--T", "2,2"], "names 2.0 twice"),
        (["--seeds", "x"], "--seeds 'x'"),
        (["--seeds", "0"], "--seeds 1 is seed 0"),
        (["--val-fraction", "1"], "--val-fraction 1"),
        (["--backend", "gpu"], "--backend 'gpu'"),
    ],
)
def test_every_bad_axis_value_is_one_line(cache_file, data_dir, tmp_path, flags, needle):
    code, err, _ = cli("sweep", "--cache", cache_file, "--data-dir", data_dir, "--out", tmp_path / "s", *flags)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_seeds_take_a_count_a_list_or_a_range():
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("5,") == (5,) and parse_seeds("3-5") == (3, 4, 5)
    assert parse_seeds("0,2") == (0, 2)
    with pytest.raises(KDCacheError):
        parse_seeds("0")


def test_a_mixed_cache_refuses_a_held_out_pick(base, cache_file, data_dir, cpu, tmp_path, monkeypatch):
    from kdcache import sweeps as sweep

    real = sweep.load_cached
    monkeypatch.setattr(sweep, "load_cached", lambda *a, **k: dataclasses.replace(real(*a, **k), mix="cutmix"))
    with pytest.raises(KDCacheError, match="mixed views"):
        _sweep(base, cache_file, data_dir, tmp_path / "s", cpu, val_fraction=0.1)


@pytest.mark.e2e
def test_the_command_writes_its_table_report_plot_and_best_checkpoint(cache_file, data_dir, tmp_path):
    from helpers import run_cli

    out = tmp_path / "sweep"
    args = (
        "sweep",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--arch",
        "seed-cnn-student",
        "--epochs",
        "1",
        "--T",
        "1,4",
        "--alpha",
        "0.9",
        "--seeds",
        "2",
        "--out",
        str(out),
    )
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "kd T=3 alpha=0.5 (card)" in r.stdout and "alone" in r.stdout and "Picked on validation" in r.stdout
    for name in ("sweep.json", "report.md", "sweep.png", "best.pt"):
        assert (out / name).is_file(), name
    record = json.loads((out / "sweep.json").read_text())
    assert len(record["students"]) == 8 and record["pick"]["on"] == "val"
    meta = load_checkpoint(out / "best.pt")[1]
    assert meta["sweep"]["setting"] == record["pick"]["key"] and meta["role"] == "student"
    again = run_cli(*args)
    assert_one_line_error(again.returncode, again.stderr, "already exists", "--force")
    r = run_cli("report", str(out))
    assert r.returncode == 0, r.stderr
    assert "Picked on validation" in r.stdout


def test_a_sweep_config_file_serves_other_commands_and_runs_no_code_it_names(cache_file, data_dir, tmp_path):
    code, err, out = cli("sweep", "--cache", cache_file, "--data-dir", data_dir, "--T", "1,4", "--print-config")
    assert code == 0, err
    assert "[sweep]" in out and "T = [1.0, 4.0]" in out
    (tmp_path / "s.toml").write_text(out)
    code, err, _ = cli("student", "--cache", cache_file, "--config", tmp_path / "s.toml", "--print-config")
    assert code == 0, err  # the [sweep] table is the sweep's; the student reads the rest
    planted = out.replace('arch = ["seed-cnn-student"]', 'arch = ["byo_models:make_bn_net"]')
    assert planted != out
    (tmp_path / "code.toml").write_text(planted)
    args = ("sweep", "--cache", cache_file, "--data-dir", data_dir, "--config", tmp_path / "code.toml")
    code, err, _ = cli(*args, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "byo_models:make_bn_net", "--trust-arch")


def test_the_python_api_returns_the_table_and_takes_a_seed_count(base, cache_file, data_dir, cpu, tmp_path):
    import kdcache

    rows = kdcache.sweep(
        cache_file,
        out=tmp_path / "api",
        recipe=dataclasses.replace(base, epochs=1),
        T=2,
        alpha=[0.5],
        seeds=1,
        val_fraction=0.0,
        backend="loop",
        data_dir=data_dir,
        runtime=cpu,
    )
    assert [r["setting"]["label"] for r in rows] == ["alone", "kd T=2 alpha=0.5", "kd T=3 alpha=0.5"]
    assert all(r["test"]["n"] == 1 for r in rows)  # seeds=1: one seed, seed 0
    record = json.loads((tmp_path / "api" / "sweep.json").read_text())
    assert record["spec"]["seeds"] == [0] and record["pick"]["optimistic"] is True  # val 0: the pick is on test
    assert "optimistic" in (tmp_path / "api" / "report.md").read_text()
