"""Function matching from the cache (view record v2): mixed views dumped once, replayed exactly
by the student, fresh views every epoch, online distillation for comparison, v1 caches still read.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY, assert_one_line_error, cli, written

from kdcache import cache as cache_io
from kdcache.batches import ViewBatches
from kdcache.checkpoints import load_checkpoint
from kdcache.cli import err_console, out_console
from kdcache.dump import dump_logits
from kdcache.inference import predict
from kdcache.stages import cached_plan, train_student
from kdcache.views import shuffle_order

MIXED = dict(views=6, seed=5, batch_size=128, subset=300, augment=True, mix="both", mix_prob=0.7)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")
    monkeypatch.setattr(err_console, "_width", 200)
    monkeypatch.setattr(out_console, "_width", 200)


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, teacher_ckpt, data_dir, cpu):
    out = tmp_path_factory.mktemp("mixed") / "mixed.h5"
    dump_logits(teacher_path=teacher_ckpt, data_dir=data_dir, out=out, rt=cpu, block_rows=100, **MIXED)
    return out


def datasets(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][...] for name in ("logits", "view_params", "labels", *cache_io.MIX_DATASETS)}


def test_mixed_dump_stores_the_v2_record(mixed_cache):
    with cache_io.open_cache(mixed_cache) as c:
        assert c.attrs["format_version"] == 2 and c.mix == "both" and c.attrs["mix_prob"] == 0.7
        logits, views, labels = c.tensors()
    mix = views.mix
    assert logits.shape == (300, 6, 10) and mix.partner.shape == (300, 6) and mix.box.shape == (300, 6, 4)
    mixed = mix.partner >= 0
    assert 0.5 < mixed.float().mean() < 0.9  # mix_prob 0.7
    cut = mixed & (mix.box[..., 2].int() * mix.box[..., 3].int() > 0)
    assert cut.any() and (mixed & ~cut).any()  # CutMix and MixUp views both there
    assert torch.equal(mix.lam[~mixed], torch.ones(int((~mixed).sum())))


def test_two_dumps_with_the_same_seed_are_identical_whatever_the_batch_and_block_size(
    tmp_path, mixed_cache, teacher_ckpt, data_dir, cpu
):
    again = tmp_path / "again.h5"
    dump_logits(teacher_path=teacher_ckpt, data_dir=data_dir, out=again, rt=cpu, block_rows=100, **MIXED)
    a, b = datasets(mixed_cache), datasets(again)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a), "same seed, same bytes"
    other = tmp_path / "other.h5"
    dump_logits(
        teacher_path=teacher_ckpt, data_dir=data_dir, out=other, rt=cpu, block_rows=64, **{**MIXED, "batch_size": 50}
    )
    c = datasets(other)
    for name in ("view_params", *cache_io.MIX_DATASETS):  # views never depend on batch or block size
        assert np.array_equal(a[name], c[name]), name
    assert np.allclose(a["logits"], c["logits"], atol=2e-3)


def test_teacher_rerun_on_rerendered_mixed_views_gives_the_cached_logits(mixed_cache, teacher_ckpt, data_dir, cpu):
    from kdcache.data import load_dataset

    teacher, meta = load_checkpoint(teacher_ckpt)
    data = load_dataset("cifar10", data_dir, 300)
    with cache_io.open_cache(mixed_cache) as c:
        logits, views, _ = c.tensors()
    rows = torch.arange(300).repeat_interleave(6)
    fresh = predict(
        teacher,
        data.train_x,
        meta["normalize_mean"],
        meta["normalize_std"],
        cpu,
        rows=rows,
        views=views.flatten(),
        batch_size=77,
    )
    cached = logits.flatten(0, 1).float()
    assert torch.allclose(fresh, cached, atol=1e-2, rtol=1e-3)  # fp16 storage


def test_student_batches_carry_the_partner_labels_and_weights(mixed_cache, data_dir):
    from kdcache.data import load_dataset

    data = load_dataset("cifar10", data_dir, 300)
    with cache_io.open_cache(mixed_cache) as c:
        logits, views, _ = c.tensors()
    plan = cached_plan(views, logits, 0, "cpu")
    batches = ViewBatches(data.train_x, data.train_y, plan, 64, 0, (0.5,) * 3, (0.25,) * 3)
    epoch, order = plan(3), shuffle_order(0, 300, 3)
    for i, b in enumerate(batches.epoch(3)):
        m = epoch.views.mix[order[i * 64 : (i + 1) * 64]]
        assert torch.equal(b.y2, data.train_y[m.partner.clamp(min=0)]) and torch.equal(b.lam, m.lam)


def _schedule(epoch: int, k: int) -> torch.Tensor:
    from kdcache.views import view_schedule

    return view_schedule(0, 300, k, epoch)


def test_k_at_least_epochs_shows_a_new_view_every_epoch(mixed_cache):
    with cache_io.open_cache(mixed_cache) as c:
        logits, views, _ = c.tensors()
    plan = cached_plan(views, logits, 0, "cpu")
    seen = torch.stack([_schedule(e, 6) for e in range(6)], dim=1)  # [N, epochs]
    assert all(len(set(row.tolist())) == 6 for row in seen)
    assert torch.equal(plan(2).views.mix.partner, views.mix.partner[torch.arange(300), seen[:, 2]])
    code, err, out = cli("inspect", mixed_cache)
    assert code == 0, err
    assert "each view once every 6 epochs" in out and "mixed: both" in out


def test_student_trains_on_a_mixed_cache_and_logs_fidelity(tmp_path, mixed_cache, data_dir, cpu):
    result = train_student(
        TINY.override(epochs=2, loss="dkd", subset=300),
        cache_file=mixed_cache,
        data_dir=data_dir,
        out=tmp_path / "s.pt",
        rt=cpu,
    )
    last = result.history[-1]
    assert 0.0 <= last["teacher_agreement"] <= 1.0 and last["teacher_kl"] >= 0.0
    assert load_checkpoint(tmp_path / "s.pt")[1]["recipe"]["mix"] == "both"


def test_online_student_runs_the_teacher_on_fresh_mixed_views(tmp_path, teacher_ckpt, data_dir, cpu):
    recipe = TINY.override(epochs=2, subset=300, mix="cutmix", views=1)
    result = train_student(
        recipe, cache_file=None, online_teacher=teacher_ckpt, data_dir=data_dir, out=tmp_path / "online.pt", rt=cpu
    )
    meta = load_checkpoint(tmp_path / "online.pt")[1]
    assert meta["online_teacher_sha256"] and "teacher_agreement" in result.history[-1]


@pytest.fixture
def mixed_teacher(tmp_path, teacher_ckpt):
    """The tiny teacher, recorded as trained on plain images mixed by CutMix half the time."""
    record = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    record["recipe"] = {**record["recipe"], "augment": False, "mix": "cutmix", "mix_prob": 0.5}
    torch.save(record, tmp_path / "mixed-teacher.pt")
    return tmp_path / "mixed-teacher.pt"


def test_dump_cli_mixes_as_the_teacher_was_trained_whatever_the_preset(tmp_path, mixed_teacher, data_dir):
    """The mix is the teacher's (its --mix help says so); crop/flip stays the preset's (seed-resnet: on)."""
    common = ("--teacher", mixed_teacher, "--data", data_dir, "--subset", "200", "--views", "2", "--device", "cpu")
    code, err, _ = cli("dump-logits", "--preset", "seed-resnet", *common, "--out", tmp_path / "a.h5")
    assert code == 0, err
    with cache_io.open_cache(tmp_path / "a.h5") as c:
        assert (bool(c.attrs["augment"]), c.mix, float(c.attrs["mix_prob"])) == (True, "cutmix", 0.5)
    code, err, _ = cli("dump-logits", "--preset", "seed-resnet", *common, "--mix", "mixup", "--out", tmp_path / "b.h5")
    assert code == 0, err
    with cache_io.open_cache(tmp_path / "b.h5") as c:
        assert (c.mix, float(c.attrs["mix_prob"])) == ("mixup", 0.5)


def test_online_student_cli_takes_the_teachers_view_family_whatever_the_preset(tmp_path, mixed_teacher, data_dir):
    """The online row must see the views the teacher trained on, as a cache student sees the dump's:
    a --preset (here seed-resnet: crop/flip, no mixing) does not change them; --mix does."""
    common = (
        "--arch",
        "seed-cnn-student",
        "--online-teacher",
        mixed_teacher,
        "--data",
        data_dir,
        "--subset",
        "300",
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--device",
        "cpu",
    )
    code, err, _ = cli("student", "--preset", "seed-resnet", *common, "--out", tmp_path / "a.pt")
    assert code == 0, err
    views = {k: load_checkpoint(tmp_path / "a.pt")[1]["recipe"][k] for k in ("augment", "mix", "mix_prob")}
    assert views == {"augment": False, "mix": "cutmix", "mix_prob": 0.5}
    code, err, _ = cli(
        "student", "--preset", "seed-resnet", *common, "--augment", "--mix", "none", "--out", tmp_path / "b.pt"
    )
    assert code == 0, err
    recipe = load_checkpoint(tmp_path / "b.pt")[1]["recipe"]
    assert (recipe["augment"], recipe["mix"]) == (True, "none")
    code, err, _ = cli("student", "--preset", "seed-resnet", *common, "--no-augment", "--out", tmp_path / "c.pt")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "c.pt")[1]["recipe"]["augment"] is False  # the flag, not the preset


def test_v1_caches_still_train(tmp_path, cache_file, data_dir):
    """A v1 file (crop/flip views, no mix attributes) reads as unmixed views."""
    v1 = tmp_path / "v1.h5"
    v1.write_bytes(cache_file.read_bytes())
    with h5py.File(v1, "r+") as f:
        f.attrs["format_version"] = 1
        for key in ("mix", "mix_prob"):
            del f.attrs[key]
    code, err, _ = cli("student", "--cache", v1, "--data-dir", data_dir, "--out", tmp_path / "s.pt", "--epochs", "1")
    assert code == 0, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--mix-prob", "1.5"], "--mix-prob must be in [0, 1]"),
        (["--mix-prob", "nan"], "--mix-prob"),
        (["--mix", "blend"], "--mix must be one of"),
    ],
)
def test_bad_mix_flags_are_one_line_errors(tmp_path, teacher_ckpt, data_dir, args, needle):
    for command in (["teacher", "--preset", "seed-cnn"], ["dump-logits", "--teacher", teacher_ckpt]):
        code, err, _ = cli(*command, "--data-dir", data_dir, "--out", tmp_path / "o" / "x", *args)
        assert_one_line_error(code, err, needle)
    assert written(tmp_path / "o") == []


@pytest.mark.parametrize("flag", [["--augment"], ["--no-augment"], ["--mix", "cutmix"], ["--mix-prob", "0.5"]])
def test_view_flags_on_a_cache_student_are_one_line_errors(tmp_path, cache_file, data_dir, flag):
    code, err, _ = cli(
        "student", "--cache", cache_file, "--data-dir", data_dir, "--out", tmp_path / "o" / "s.pt", *flag
    )
    assert_one_line_error(code, err, flag[0].split("/")[0].replace("--no-", "--"), "goes with --online-teacher")
    assert written(tmp_path / "o") == []


def test_unknown_loss_is_a_one_line_error(tmp_path, cache_file, data_dir):
    code, err, _ = cli(
        "student", "--cache", cache_file, "--data-dir", data_dir, "--out", tmp_path / "s.pt", "--loss", "mse"
    )
    assert_one_line_error(code, err, "--loss must be one of")


def test_verify_checks_the_mix_record(tmp_path, mixed_cache, teacher_ckpt, data_dir):
    code, err, out = cli("verify", mixed_cache, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", "32")
    assert code == 0, out
    edited = tmp_path / "edited.h5"
    edited.write_bytes(mixed_cache.read_bytes())
    with h5py.File(edited, "r+") as f:
        lam = f["mix_lam"][150]
        f["mix_lam"][150] = np.where(lam < 1, lam / 2, lam)
    code, _, out = cli("verify", edited, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", "8")
    assert code == 1 and "150" in out and "changed after the dump" in out


def test_mix_record_partner_out_of_range_is_refused(tmp_path, mixed_cache, data_dir):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(mixed_cache.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["mix_partner"][7, 0] = 10_000
    code, err, _ = cli("student", "--cache", bad, "--data-dir", data_dir, "--out", tmp_path / "s" / "s.pt")
    assert_one_line_error(code, err, "mix partners")
    assert written(tmp_path / "s") == []


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda f: f.attrs.__setitem__("mix", "foo"), "mix='foo'"),
        (lambda f: f.attrs.__delitem__("mix_prob"), "mix_prob"),
        (lambda f: f["mix_lam"].__setitem__((4, 1), 2.0), "out of range"),
        (lambda f: f["mix_box"].__setitem__((4, 1), [30, 0, 8, 8]), "out of range"),
    ],
    ids=["unknown-mix", "no-mix-prob", "lam-2", "box-outside"],
)
def test_edited_mix_attributes_and_records_are_refused(tmp_path, mixed_cache, data_dir, edit, needle):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(mixed_cache.read_bytes())
    with h5py.File(bad, "r+") as f:
        edit(f)
    code, err, _ = cli("student", "--cache", bad, "--data-dir", data_dir, "--out", tmp_path / "s" / "s.pt")
    assert_one_line_error(code, err, needle)
    assert written(tmp_path / "s") == []
