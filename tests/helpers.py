"""Helpers shared by the test modules: paths, the tiny recipe, ways to run the CLI, and the checks
of a refused command. Fixtures stay in conftest.py; a test module imports what it shares from here,
never from another test module or the conftest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdcache.config import get_preset

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "cifar10"
SHARED_CALTECH = ROOT.parent / "shared" / "caltech101"

# One thread in tests' subprocesses (conftest sets it for the test process): timings stay
# predictable on a shared 2-core machine (two oversubscribed torch thread pools run 10x slower),
# and runs compared bit for bit use the same thread count.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A small, fast recipe for tests: notebook-2 CNNs on generated data.
TINY = get_preset("seed-cnn").override(epochs=2, batch_size=64, subset=400).override_teacher(epochs=1)


# ---- running the CLI ------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m kdcache ARGS` as a user would, in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "kdcache", *args],
        cwd=cwd,
        env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


# Runs kdcache's command line and, at exit, writes this process's own peak resident memory (VmHWM, which
# exec starts afresh; a child's rusage maxrss would include the forking test process's pages) to $PEAK_FILE.
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in f if line.startswith("VmHWM")))
atexit.register(_peak)
sys.argv = ["kdcache", *sys.argv[1:]]
runpy.run_module("kdcache", run_name="__main__")
"""


def run_cli_peak(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`run_cli`, and the peak resident memory of that one process in MB (its own VmHWM, Linux)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_WRAPPER, *args],
            env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "PEAK_FILE": str(peak_file)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        return done, int(peak_file.read_text()) / 1024  # kB


def start_cli(*args: str) -> subprocess.Popen:
    """`python -m kdcache ARGS` in the background, as `run_cli` runs it (one thread, offline)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1", "KDCACHE_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and the
        # child would inherit that (CI may run us so): give it the terminal's Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 180.0) -> None:
    """Poll `condition` until it holds; fail if the process ends first (it must be caught mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    raise AssertionError(f"timed out waiting for {what}")


def cli(*args: str):
    """The CLI in this process: (exit code, stderr, stdout)."""
    from typer.testing import CliRunner

    from kdcache.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr, result.stdout


# ---- what a refused command must look like --------------------------------------------------------


def assert_one_line_error(code: int, stderr: str, *needles: str, started: bool = False) -> str:
    """Exit 2; exactly one `error:` line, the last thing printed; no traceback; `needles` in it.

    `started`: the failure came after the inputs were accepted, so the stage's one
    progress note ("dump 100 cifar10 images x 4 view(s) ...") may stand before it.
    """
    assert code == 2, f"exit {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    # Inputs are checked before anything is printed, so the error is all there is.
    assert len(lines) == (2 if started and len(lines) > 1 else 1), stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def written(folder: Path) -> list[str]:
    """What a failed command left in its output folder (must be nothing)."""
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ---- the dump that the resume and reliability tests interrupt -------------------------------------

# 400 images x 8 views in 20 blocks of 20 rows.
DUMP_ROWS, DUMP_VIEWS, DUMP_BLOCK, DUMP_BATCH, DUMP_SEED = 400, 8, 20, 40, 3  # seconds: signals land mid-dump


def dump_args(teacher: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "dump-logits",
        "--teacher",
        str(teacher),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--subset",
        str(DUMP_ROWS),
        "--views",
        str(DUMP_VIEWS),
        "--block-rows",
        str(DUMP_BLOCK),
        "--batch-size",
        str(DUMP_BATCH),
        "--seed",
        str(DUMP_SEED),
        "--augment",
        "--device",
        "cpu",
    ]
