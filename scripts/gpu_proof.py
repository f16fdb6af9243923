"""The GPU proof in one command (`make gpu-proof`): a fast strong teacher, a mixed-view cache, ResNet18
students alone and distilled, an online row and `kdcache bench`, within a wall-clock budget.

Every stage runs the real CLI in a subprocess and checks the clock first: a stage starts only while the
budget lasts and is stopped when it runs out, so a slow machine still yields the rows it finished.
Prints one table and writes one JSON (OUT/proof.json), rewritten after every stage.

    python scripts/gpu_proof.py --data-dir /tmp/c10 --out runs/gpu-proof            # H100/H200, ~7 min
    python scripts/gpu_proof.py --tiny --data-dir data --out runs/gpu-proof-tiny     # CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The full scale (one H100/H200) and the tiny scale (a CPU, to keep the script from rotting).
SCALES = {
    "full": dict(
        teacher=["--arch", "airbench95", "--epochs", "20"],
        subset=[],
        views="40",
        student="resnet18",
        student_epochs="40",
        student_flags=["--preset", "cifar10-fast"],
        alone=["--batch-size", "512", "--warmup-epochs", "2"],
        bench=["--batch-size", "512"],
    ),
    "tiny": dict(
        teacher=["--arch", "airbench94", "--epochs", "1", "--batch-size", "64", "--warmup-epochs", "0"],
        subset=["--subset", "256"],
        views="2",
        student="seed-cnn-student",
        student_epochs="1",
        student_flags=["--preset", "cifar10-fast", "--batch-size", "64", "--warmup-epochs", "0"],
        alone=["--batch-size", "64"],
        bench=[
            "--teacher-arch",
            "seed-cnn-teacher",
            "--student-arch",
            "seed-cnn-student",
            "--batch-size",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
        ],
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-proof")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all stages (default 7 min)")
    ap.add_argument("--tiny", action="store_true", help="a tiny CPU run of every stage (CI)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    scale = SCALES["tiny" if args.tiny else "full"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    record = {"scale": "tiny" if args.tiny else "full", "budget_s": args.budget_s, "rows": []}
    common = ["--data-dir", str(args.data_dir), "--device", args.device]

    def stage(name: str, argv: list[str], artifact: Path | None = None) -> dict:
        left = args.budget_s - (time.monotonic() - t0)
        row = {"stage": name, "command": "kdcache " + " ".join(argv)}
        if left <= 5:
            row["status"] = "skipped (budget spent)"
        else:
            start = time.monotonic()
            env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "kdcache", *argv], env=env, capture_output=True, text=True, timeout=left
                )
                row["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
                log = "".join(c if c.isalnum() else "_" for c in name).strip("_") + ".log"
                (out / log).write_text(done.stdout + done.stderr)
            except subprocess.TimeoutExpired:
                row["status"] = "stopped (budget spent)"
            row["wall_s"] = round(time.monotonic() - start, 1)
        if artifact is not None and row["status"] == "ok":
            row.update(_metrics(artifact))
        record["rows"].append(row)
        record["elapsed_s"] = round(time.monotonic() - t0, 1)
        (out / "proof.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name:<24} {row['status']:<24} {_fmt(row)}", flush=True)
        return row

    teachers = [out / "teacher.pt", out / "teacher_2.pt"]
    stage(
        "teacher",
        [
            "teacher",
            "--preset",
            "cifar10-fast",
            *scale["teacher"],
            *scale["subset"],
            *common,
            "--tta-eval",  # airbench's figures are with test-time augmentation: the proof reports both
            "flip,flip-translate",
            "--out",
            str(teachers[0]),
            "--force",
        ],
        teachers[0],
    )
    stage(
        "teacher_2 (seed 1)",
        [
            "teacher",
            "--preset",
            "cifar10-fast",
            *scale["teacher"],
            *scale["subset"],
            *common,
            "--seed",
            "1",
            "--out",
            str(teachers[1]),
            "--force",
        ],
        teachers[1],
    )
    members = [t for t in teachers if t.exists()]
    cache = out / "fm.h5"
    dumped = stage(
        "dump (mixed, ensemble)" if len(members) > 1 else "dump (mixed)",
        [
            "dump-logits",
            *sum((["--teacher", str(t)] for t in members), []),
            "--views",
            scale["views"],
            "--augment",
            "--mix",
            "cutmix",
            "--mix-prob",
            "0.5",
            "--batch-size",
            "1024",
            *common,
            "--out",
            str(cache),
            "--force",
        ],
    )
    if dumped["status"] == "ok":
        dumped.update(_cache_facts(cache))
    student = [
        "--arch",
        scale["student"],
        "--epochs",
        scale["student_epochs"],
        *scale["student_flags"],
        *common,
        "--force",
    ]
    # the baseline everyone runs: ResNet18 alone on fresh crop/flip views (notebook 1's recipe at this budget)
    stage(
        "alone, crop/flip",
        [
            "teacher",
            "--preset",
            "seed-resnet",
            "--arch",
            scale["student"],
            "--epochs",
            scale["student_epochs"],
            *scale["alone"],
            "--lr",
            "0.2",
            "--nesterov",
            "--schedule",
            "cosine",
            "--augment",
            "--mix",
            "none",
            *scale["subset"],
            *common,
            "--out",
            str(out / "alone_cf.pt"),
            "--force",
        ],
        out / "alone_cf.pt",
    )
    for name, flags, file in (
        ("alone, mixed views", ["--alpha", "0"], "alone_fm.pt"),
        ("FM KD T=3 alpha=0.5", ["--T", "3", "--alpha", "0.5"], "kd_fm.pt"),
        ("FM KD T=1 alpha=1", ["--T", "1", "--alpha", "1"], "kd_fm_t1.pt"),
    ):
        stage(name, ["student", "--cache", str(cache), *flags, *student, "--out", str(out / file)], out / file)
    if members:
        stage(
            "online FM KD T=3 alpha=0.5",
            [
                "student",
                "--online-teacher",
                str(members[0]),
                "--augment",
                "--mix",
                "cutmix",
                "--mix-prob",
                "0.5",
                "--T",
                "3",
                "--alpha",
                "0.5",
                *scale["subset"],
                *student,
                "--out",
                str(out / "online_fm.pt"),
            ],
            out / "online_fm.pt",
        )
    bench = stage("bench", ["bench", *scale["bench"], "--device", args.device, "--json", str(out / "bench.json")])
    if bench["status"] == "ok" and (out / "bench.json").exists():
        record["bench"] = json.loads((out / "bench.json").read_text())
        (out / "proof.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'proof.json'} ({record['elapsed_s']:.0f} s of {args.budget_s:.0f})")
    return 0 if all(r["status"] == "ok" for r in record["rows"]) else 1


def _metrics(checkpoint: Path) -> dict:
    import torch

    m = torch.load(checkpoint, map_location="cpu", weights_only=True)["metrics"]
    return {k: v for k, v in m.items() if k.startswith("test_acc") or k == "train_time_s"}


def _cache_facts(cache: Path) -> dict:
    import h5py

    with h5py.File(cache, "r") as f:
        return {
            "teacher_test_acc": float(f.attrs["teacher_test_acc"]),
            "dump_time_s": float(f.attrs["dump_time_s"]),
            "cache_mb": round(cache.stat().st_size / 1e6, 1),
        }


def _fmt(row: dict) -> str:
    parts = [f"{k} {100 * v:.2f}%" for k, v in row.items() if k.startswith(("test_acc", "teacher_test_acc"))]
    parts += [f"train {row['train_time_s']:.1f} s"] if "train_time_s" in row else []
    parts += [f"wall {row['wall_s']:.0f} s"] if "wall_s" in row else []
    return " · ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
