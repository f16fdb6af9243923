"""`kdcache bench` at toy sizes: every loop measured, table and JSON complete."""

import json

import pytest
from typer.testing import CliRunner

from kdcache.cli import app

KEYS = ("seed_loop_img_s", "online_img_s", "cached_img_s", "plain_img_s", "dump_img_s", "device")


def test_bench_smoke_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--teacher-arch",
            "seed-cnn-student",
            "--student-arch",
            "seed-cnn-student",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    for loop in ("seed_loop", "online", "cached", "plain", "dump"):
        assert loop in r.output
    record = json.loads(out.read_text())
    for key in KEYS:
        assert key in record
    for key in KEYS[:-1]:
        assert record[key] > 0
    assert record["batch_size"] == 8 and record["teacher_arch"] == "seed-cnn-student"
    assert record["ratios"]["cached_over_online"] == record["cached_img_s"] / record["online_img_s"]
    for loop in ("seed_loop", "online", "cached", "plain", "dump"):  # two rounds each; the figure is their median
        rounds = record["rounds_img_s"][loop]
        assert len(rounds) == 2 and record[f"{loop}_img_s"] == sum(rounds) / 2
    assert record["repeats"] == 2
    assert "B top-10" in r.output and record["cache_bytes_per_view"]["100"]["dense"] == 200
    ratios = record["ratios"]  # the KD loss's share of a step: the same mixed views with and without it
    assert ratios["kd_loss_overhead"] == record["cached_mixed_alone_img_s"] / record["cached_mixed_img_s"] - 1
    assert "the KD loss adds" in r.output and "cached_mixed_alone" in r.output
    # what mixing costs without a cache: fresh mixed views, no teacher, against the cached ones at alpha 0
    assert record["plain_mixed_img_s"] > 0 and len(record["rounds_img_s"]["plain_mixed"]) == 2
    assert (
        ratios["cached_mixed_alone_over_plain_mixed"]
        == record["cached_mixed_alone_img_s"] / record["plain_mixed_img_s"]
    )
    assert "fresh mixed views (what mixing costs)" in r.output and "the cache's own cost" in r.output


def test_folder_bench_measures_the_imagefolder_loop_and_every_store(tmp_path):
    from kdcache.folders import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", classes=3, per_class=12)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--data",
            str(folder),
            "--teacher-arch",
            "seed-cnn-teacher",
            "--student-arch",
            "seed-cnn-student",
            "--image-size",
            "24",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        env={"COLUMNS": "200", "KDCACHE_STORE_DIR": str(tmp_path / "user-stores")},
    )
    assert r.exit_code == 0, r.output
    record = json.loads(out.read_text())
    for loop in (
        "imagefolder_online",
        "imagefolder_plain",
        "plain",
        "cached",
        "plain_streamed",
        "cached_streamed",
        "cached_jpeg",
    ):
        assert record[f"{loop}_img_s"] > 0 and loop in r.output
    ratios = record["ratios"]
    assert ratios["streamed_over_resident"] == record["cached_streamed_img_s"] / record["cached_img_s"]
    assert (
        ratios["cached_jpeg_over_imagefolder_online"]
        == record["cached_jpeg_img_s"] / record["imagefolder_online_img_s"]
    )
    assert record["prepare_images"] == 45 and record["prepare_img_s"] > 0 and record["prepare_jpeg_img_s"] > 0
    sizes = record["store_bytes"]
    assert sizes["jpeg"] < sizes["raw"] and sizes["folder"] > 0 and record["teacher_arch"] == "seed-cnn-teacher"
    assert "cached over the ImageFolder online-KD loop" in r.output
    assert not (tmp_path / "user-stores").exists()  # the bench prepares its own, temporary store


@pytest.mark.torchrun
def test_procs_bench_runs_two_torchrun_processes_against_one(tmp_path):
    out = tmp_path / "procs.json"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "--procs",
            "2",
            "--teacher-arch",
            "seed-cnn-student",
            "--student-arch",
            "seed-cnn-student",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    record = json.loads(out.read_text())
    assert [x["world"] for x in record["rounds_img_s"]["1"]] == [1]  # really one process, then really two
    assert [x["world"] for x in record["rounds_img_s"]["2"]] == [2]
    for loop in ("cached", "dump"):
        one, two = record[f"{loop}_img_s"]["1"], record[f"{loop}_img_s"]["2"]
        assert one > 0 and two > 0 and loop in r.output
        assert record["ratios"][f"{loop}_2_over_1"] == two / one


def test_procs_bench_refuses_one_process():
    r = CliRunner().invoke(app, ["bench", "--procs", "1", "--device", "cpu"])
    assert r.exit_code == 2 and "--procs must be >= 2" in r.output


def test_bench_record_states_top_k_bytes_per_view_against_dense():
    from kdcache.bench import _cache_bytes

    sizes = _cache_bytes()
    assert sizes["1000"] == {"dense": 2000, "top10": 64}  # 10 x (fp16 + int16) + 6 fp32 log-sum-exps
    assert (
        sizes["10"]["dense"] == 20 and sizes["10"]["top10"] > sizes["10"]["dense"]
    )  # dense stays the default for few classes
