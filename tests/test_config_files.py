"""Config files: one resolver (flag > file > --preset or the upstream record > default), TOML round trips,
one-line errors naming the file and key, and runs repeated from an artifact's recorded recipe."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from helpers import run_cli

from kdcache.checkpoints import read_checkpoint
from kdcache.config import PRESETS, DumpSettings, Recipe, dump_settings, read_config, resolve, to_toml
from kdcache.errors import KDCacheError


def _file(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_toml(tmp_path, name):
    preset = PRESETS[name]
    back = resolve(None, read_config(_file(tmp_path, to_toml(preset))), None, {})
    assert back.for_teacher() == preset.for_teacher()  # what the teacher stage trains with
    assert to_toml(back) == to_toml(preset)  # and every student-side field
    # a recipe whose teacher overrides came from flags, subset "all" included
    odd = preset.override_teacher(lr=0.3, epochs=5).override(subset=None, mean=(0.5, 0.25, 0.125))
    odd = dataclasses.replace(odd, subset=None)
    again = resolve("demo", read_config(_file(tmp_path, to_toml(odd))), None, {})  # the file beats the preset
    assert again.for_teacher() == odd.for_teacher() and again.subset is None and again.mean == (0.5, 0.25, 0.125)


def test_precedence_flag_over_file_over_upstream_over_default(tmp_path):
    upstream = dataclasses.asdict(Recipe(lr=0.3, epochs=7))
    cfg = read_config(_file(tmp_path, "lr = 0.5\n"))
    assert resolve(None, cfg, upstream, {"lr": 0.7}).lr == 0.7  # the flag
    assert resolve(None, cfg, upstream, {"lr": None}).lr == 0.5  # the file
    assert resolve(None, cfg, upstream, {}).epochs == 7  # the upstream record, where the file is silent
    assert resolve(None, {}, None, {}).lr == PRESETS["seed-resnet"].lr  # the default preset
    assert resolve("seed-cnn", {}, upstream, {}).optimizer == "adam"  # --preset instead of the record
    named = read_config(_file(tmp_path, 'preset = "seed-cnn"\nepochs = 3\n'))
    picked = resolve(None, named, upstream, {})  # the file's preset instead of the record
    assert (picked.optimizer, picked.epochs) == ("adam", 3)
    # the teacher stage: flags are its own settings, the file's [teacher] table replaces the preset's
    cfg = read_config(_file(tmp_path, "lr = 0.05\n[teacher]\nlr = 0.9\nepochs = 4\n"))
    teacher = resolve("cifar10-fast", cfg, None, {"lr": None, "epochs": 6}, teacher_stage=True).for_teacher()
    assert (teacher.lr, teacher.epochs, teacher.label_smoothing) == (0.9, 6, 0.0)
    assert resolve("cifar10-fast", cfg, None, {}).lr == 0.05


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr = 1\n", "unknown key 'lrr': did you mean 'lr'?"),
        ('lr = "fast"\n', "lr must be a number (got 'fast')"),
        ("epochs = 2.5\n", "epochs must be a whole number (got 2.5)"),
        ("augment = 1\n", "augment must be true or false (got 1)"),
        ("mean = [0.5, 0.5]\n", "mean must be a list of 3 numbers"),
        ("subset = true\n", 'subset must be a whole number or "all" (got True)'),
        ("lr = -1.0\n", "lr must be > 0 (got -1.0)"),
        ('mix = "blend"\n', "mix must be one of"),
        ("[teacher]\nmomentum = 1.5\n", "momentum must be in [0, 1) (got 1.5)"),
        ("[teacher]\nfoo = 1\n", "unknown key 'teacher.foo'"),
        ('preset = "nope"\n', "unknown preset 'nope'"),
        ("lr = [1\n", "not valid TOML"),
        ("teacher = 3\n", "teacher must be a [teacher] table"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(KDCacheError) as e:
        resolve(None, read_config(path), None, {}, config_path=path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[dump]\ntta = "flop"\n', "dump.tta must be one of none, flip, flip-translate (got 'flop')"),
        ("[dump]\ntopp = 3\n", "unknown key 'dump.topp': did you mean 'topk'?"),
        ("[dump]\ntopk = 2.5\n", "dump.topk must be a whole number (got 2.5)"),
        ("[dump]\ntopk = -1\n", "dump.topk must be >= 1, or 0 for every logit (got -1)"),
        ("[dump]\nblock_rows = 0\n", "dump.block_rows must be >= 1 (got 0)"),
        ("[dump]\ntopk = 5\ntopk_temperatures = [2, -1]\n", "dump.topk_temperatures must be finite numbers > 0"),
        ('[dump]\ntopk_temperatures = ["a"]\n', "dump.topk_temperatures must be a list of numbers"),
        ("[dump]\ntopk_temperatures = [2.0]\n", "dump.topk_temperatures goes with dump.topk K"),
        ("dump = 3\n", "dump must be a [dump] table"),
    ],
)
def test_bad_dump_tables_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(KDCacheError) as e:
        dump_settings(read_config(path), path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_dump_settings_flag_over_file_over_default_and_round_trip(tmp_path):
    assert dump_settings({}) == DumpSettings() and DumpSettings().topk == 0 and DumpSettings().tta == "none"
    cfg = read_config(_file(tmp_path, '[dump]\ntta = "flip"\ntopk = 5\nbatch_size = 64\n'))
    got = dump_settings(cfg, tta="none", topk=None, batch_size=None, block_rows=None, topk_temperatures=None)
    assert got == DumpSettings(tta="none", topk=5, batch_size=64)  # the typed --tta wins, the file fills the rest
    with pytest.raises(KDCacheError, match="^--topk must be >= 1"):  # a bad flag is named as the flag
        dump_settings(cfg, topk=-2)
    printed = to_toml(Recipe(), dump=DumpSettings("flip-translate", 10, (1.0, 4.0), 256, 64))
    assert dump_settings(read_config(_file(tmp_path, printed, "p.toml"))) == DumpSettings(
        "flip-translate", 10, (1.0, 4.0), 256, 64
    )


def test_dump_settings_combine_file_and_flags_before_checking_topk_and_its_grid(tmp_path):
    path = _file(tmp_path, "[dump]\ntopk = 10\ntopk_temperatures = [1.0, 2.0]\n")  # as inspect --config writes
    assert dump_settings(read_config(path), path, topk=0) == DumpSettings()  # every logit: the grid goes too
    grid_only = _file(tmp_path, "[dump]\ntopk_temperatures = [1.0, 2.0]\n", "grid.toml")
    assert dump_settings(read_config(grid_only), grid_only, topk=4) == DumpSettings(
        topk=4, topk_temperatures=(1.0, 2.0)
    )
    with pytest.raises(KDCacheError, match=r"grid.toml: dump.topk_temperatures goes with dump.topk K"):
        dump_settings(read_config(grid_only), grid_only)
    with pytest.raises(KDCacheError, match="^--topk-temperatures goes with --topk K"):  # typed: named as the flag
        dump_settings({}, topk_temperatures=(2.0,))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"topk": "3"}, "--topk must be a whole number"),
        ({"batch_size": 2.5}, "--batch-size must be a whole number"),
        ({"tta": 1}, "--tta must be one of"),
        ({"topk": 2, "topk_temperatures": "2"}, "must be a list of numbers"),
        ({"block_rows": True}, "--block-rows must be a whole number"),
    ],
)
def test_dump_settings_from_python_check_types(fields, message):
    with pytest.raises(KDCacheError, match=message):
        DumpSettings(**fields)
    assert DumpSettings(topk=np.int64(3), topk_temperatures=[2, 1.5]) == DumpSettings(
        topk=3, topk_temperatures=(2.0, 1.5)
    )


def test_api_dump_logits_refuses_settings_given_twice(tmp_path):
    import kdcache

    for extra in ({"tta": "flip"}, {"batch_size": 64}):
        with pytest.raises(KDCacheError, match="came twice"):
            kdcache.dump_logits(
                Recipe(), teacher=tmp_path / "t.pt", out=tmp_path / "c.h5", dump=DumpSettings(), **extra
            )
    assert not (tmp_path / "c.h5").exists()


def test_cli_config_errors_and_print_config(tmp_path):
    bad = _file(tmp_path, "lrr = 1\n", "bad.toml")
    r = run_cli("teacher", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown key 'lrr'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("teacher", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "no such config file" in r.stderr
    good = _file(tmp_path, 'preset = "demo"\nlr = 0.02\n[teacher]\nlr = 0.2\nepochs = 3\n', "good.toml")
    r = run_cli("teacher", "--config", str(good), "--epochs", "4", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    printed = read_config(_file(tmp_path, r.stdout, "printed.toml"))
    assert printed["lr"] == 0.02 and printed["teacher"] == {"lr": 0.2, "epochs": 4}  # the flag wins
    assert printed["subset"] == 10000 and printed["student_arch"] == "seed-cnn-student"  # the file's preset
    assert not (tmp_path / "saved_models").exists()  # nothing trained, nothing written
    code = _file(tmp_path, 'student_arch = "os:system"\n', "code.toml")
    r = run_cli("pipeline", "--config", str(code), "--print-config", cwd=tmp_path)
    assert r.returncode == 2 and "--student-arch os:system" in r.stderr  # a file alone runs no code


def test_a_student_config_cannot_change_the_caches_views(tmp_path, cache_file, data_dir):
    wrong = _file(tmp_path, "views = 9\n")
    r = run_cli(
        "student",
        "--cache",
        str(cache_file),
        "--data",
        str(data_dir),
        "--config",
        str(wrong),
        "--print-config",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "views = 9" in r.stderr and "views = 4" in r.stderr


def _weights(path):
    return read_checkpoint(path)["state_dict"]


@pytest.mark.e2e
def test_runs_repeated_from_their_recorded_config_give_the_same_artifacts(tmp_path, data_dir):
    """teacher -> dump -> student, then each repeated from `kdcache inspect FILE --config` alone
    (plus paths): the same weights, the same cached logits and views, the same recorded recipes; the
    dump's own settings (--tta, --topk, its temperatures, blocks, batch) travel in the [dump] table."""
    common = ("--data", str(data_dir), "--device", "cpu")
    first = tmp_path / "first"
    first.mkdir()
    steps = [
        ("teacher", "t.pt", ["--preset", "seed-cnn", "--subset", "200", "--epochs", "1", "--augment", "--lr", "0.002"]),
        (
            "dump-logits",
            "c.h5",
            [
                "--teacher",
                "t.pt",
                "--views",
                "2",
                "--mix",
                "cutmix",
                "--mix-prob",
                "0.5",
                "--tta",
                "flip",
                "--topk",
                "3",
                "--topk-temperatures",
                "2.5",
                "--block-rows",
                "64",
                "--batch-size",
                "100",
            ],
        ),
        ("student", "s.pt", ["--cache", "c.h5", "--epochs", "1", "--T", "2.5", "--batch-size", "32", "--seed", "3"]),
    ]
    for command, out, args in steps:
        r = run_cli(command, *args, *common, "--out", out, cwd=first)
        assert r.returncode == 0, r.stderr
    again = tmp_path / "again"
    again.mkdir()
    for command, out, _args in steps:
        r = run_cli("inspect", str(first / out), "--config", cwd=first)
        assert r.returncode == 0, r.stderr
        config = _file(again, r.stdout, out + ".toml")
        inputs = {"dump-logits": ["--teacher", "t.pt"], "student": ["--cache", "c.h5"]}.get(command, [])
        r = run_cli(command, "--config", str(config), *inputs, *common, "--out", out, cwd=again)
        assert r.returncode == 0, r.stderr
    for name in ("t.pt", "s.pt"):
        a, b = read_checkpoint(first / name), read_checkpoint(again / name)
        assert a["recipe"] == b["recipe"]
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with h5py.File(first / "c.h5") as a, h5py.File(again / "c.h5") as b:
        assert a.attrs["recipe"] == b.attrs["recipe"]
        for key in ("tta", "topk", "lse_temperatures", "block_rows", "batch_size"):  # the dump's own settings too
            assert np.array_equal(a.attrs[key], b.attrs[key]), key
        assert a.attrs["tta"] == "flip" and a.attrs["topk"] == 3 and a.attrs["block_rows"] == 64
        for key in ("topk_values", "topk_indices", "topk_lse", "view_params", "labels", "block_sha256"):
            assert np.array_equal(a[key][...], b[key][...]), key


def test_settings_an_upstream_artifact_fixes_are_accepted_when_they_agree(tmp_path, cache_file, teacher_ckpt, data_dir):
    """--dataset / --image-size (and a student's --views) repeat what the teacher or cache fixed: the same
    value is accepted (the run goes on to --print-config), another is one line naming both."""
    student = ("student", "--cache", str(cache_file), "--data", str(data_dir), "--print-config")
    assert run_cli(*student, "--image-size", "32", "--views", "4", "--dataset", "cifar10", cwd=tmp_path).returncode == 0
    r = run_cli(*student, "--views", "8", cwd=tmp_path)
    assert r.returncode == 2 and "--views 8 differs from" in r.stderr and "which has 4" in r.stderr
    dump = ("dump-logits", "--teacher", str(teacher_ckpt), "--data", str(data_dir), "--print-config")
    assert run_cli(*dump, "--image-size", "32", cwd=tmp_path).returncode == 0
    r = run_cli(*dump, "--image-size", "64", cwd=tmp_path)
    assert r.returncode == 2 and "--image-size 64 differs from" in r.stderr and "which has 32" in r.stderr
    assert r.stderr.strip().count("\n") == 0
