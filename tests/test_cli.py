"""The three commands chain with their defaults, as a user runs them, in real processes."""

import json
import shutil

import pytest
import typer.main
from helpers import run_cli
from typer.testing import CliRunner

from kdcache.cli import app


@pytest.fixture
def workdir(tmp_path, data_dir):
    shutil.copytree(data_dir, tmp_path / "data")
    return tmp_path


@pytest.mark.e2e
def test_teacher_dump_student_eval_chain_with_default_paths(workdir):
    r = run_cli(
        "teacher", "--arch", "seed-cnn-teacher", "--subset", "300", "--epochs", "1", "--device", "cpu", cwd=workdir
    )
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and (workdir / "saved_models/teacher.pt").exists()
    assert "epoch   1" in r.stderr

    r = run_cli("dump-logits", "--views", "2", "--device", "cpu", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "saved_models/teacher_logits.h5").exists()
    assert "300 images x 2 views x 10 classes" in r.stdout

    r = run_cli(
        "student",
        "--arch",
        "seed-cnn-student",
        "--T",
        "3",
        "--alpha",
        "0.5",
        "--epochs",
        "2",
        "--schedule",
        "constant",
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    lines = (workdir / "saved_models/student.pt.metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert all(0.0 <= m["test_acc"] <= 1.0 and m["train_loss"] > 0 for m in epochs)
    assert epochs[0]["lr"] == epochs[1]["lr"]  # --schedule constant beat the recorded recipe's cosine

    r = run_cli("eval", "saved_models/student.pt", cwd=workdir)
    assert r.returncode == 0, r.stderr
    acc = f"{100 * epochs[-1]['test_acc']:.2f}%"
    assert acc in r.stdout  # eval reproduces the accuracy measured at the end of training


COMMANDS = sorted(typer.main.get_command(app).commands)  # every registered command, a new one included


def test_the_command_list_is_the_apps():
    assert len(COMMANDS) >= 10 and {"teacher", "import-teacher", "dump-logits", "student", "pipeline"} <= set(COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    r = CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Usage" in r.output and len(r.output.splitlines()) > 5
    command = typer.main.get_command(app).commands[cmd]
    assert command.help and command.help.strip(), f"{cmd} has no docstring"
    assert all(p.help for p in command.params if p.param_type_name == "option"), f"{cmd}: an option without help"


def test_top_level_help_explains_the_flow():
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("teacher", "dump-logits", "student", "bench", "pipeline"):
        assert word in r.stdout


def test_into_a_pipe_each_epoch_line_and_note_stays_one_line(tmp_path, cache_file, data_dir):
    """Output to a file or a pipe is not wrapped at rich's 80 columns: each epoch's line (with a student's
    agreement and KL), the opening note and a warning are one line each, as a log reader greps them."""
    r = run_cli(
        "student",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--alpha",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "s.pt"),
        env={"COLUMNS": "80"},  # what rich assumes for a pipe when COLUMNS is unset
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(line) > 80 for line in epochs), lines
    assert all(" img/s " in line and "agrees with teacher" in line and " KL " in line for line in epochs), lines
    note = next(line for line in lines if line.startswith("student "))
    assert "views:" in note and "cpu" in note, lines  # the note's end, on its first line
    assert all(line.startswith(("student ", "epoch ", "warning: ")) for line in lines if line.strip()), lines
    assert "test accuracy" in r.stdout and max(len(line) for line in r.stdout.splitlines()) <= 80  # tables fit
