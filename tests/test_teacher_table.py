"""A teacher's own settings have one home, the recipe's `teacher` table: presets, config files' [teacher]
tables, `kdcache teacher`'s flags and the pipeline's --teacher-epochs / --teacher-augment all write there,
and artifacts from older versions, which recorded teacher_epochs and teacher_augment, still read."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.config import PRESETS, Recipe, read_config, teacher_views
from kdcache.errors import KDCacheError


def _old_record(**legacy) -> dict:
    """A recipe as an older kdcache recorded it: every field, and teacher_epochs / teacher_augment beside them."""
    return {**dataclasses.asdict(PRESETS["seed-cnn"]), "teacher": {}, **legacy}


def test_a_recorded_teacher_epochs_and_augment_read_into_the_teacher_table():
    recipe = Recipe.from_dict(_old_record(teacher_epochs=3, teacher_augment=True))
    assert recipe.teacher == {"epochs": 3, "augment": True}
    assert (recipe.epochs, recipe.augment) == (10, False)  # the students' own, as before
    assert (recipe.for_teacher().epochs, recipe.for_teacher().augment) == (3, True)
    assert Recipe.from_dict(_old_record(teacher_epochs=None, teacher_augment=None)).teacher == {}
    table_first = Recipe.from_dict({**_old_record(teacher_epochs=3), "teacher": {"epochs": 5}})
    assert table_first.for_teacher().epochs == 5  # the table said otherwise, and won then too


def test_an_old_teachers_recorded_augment_still_sets_the_views_it_is_run_on():
    taught = _old_record(teacher_augment=True)
    assert teacher_views(PRESETS["seed-cnn"], taught, augment=None).augment is True
    assert teacher_views(PRESETS["seed-cnn"], taught, augment=False).augment is False  # a typed flag wins


def _printed(tmp_path, *args) -> dict:
    result = CliRunner().invoke(app, ["pipeline", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    (tmp_path / "printed.toml").write_text(result.stdout)
    return read_config(tmp_path / "printed.toml")


def test_the_pipelines_teacher_flags_write_the_teacher_table(tmp_path):
    printed = _printed(tmp_path, "--preset", "cifar10-fast", "--teacher-epochs", "5", "--epochs", "3")
    assert printed["epochs"] == 3 and printed["teacher"]["epochs"] == 5  # the typed flag beats the preset's 16
    assert printed["teacher"]["lr"] == PRESETS["cifar10-fast"].teacher["lr"]  # the rest of the table kept
    printed = _printed(tmp_path, "--preset", "demo", "--no-teacher-augment")
    assert printed["teacher"] == {"epochs": 8, "augment": False} and printed["augment"] is False


def test_a_config_file_names_the_teacher_table_for_teacher_epochs(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("teacher_epochs = 3\n")
    with pytest.raises(KDCacheError, match=r"old.toml: unknown key 'teacher_epochs': .*\[teacher\] table"):
        read_config(path)
    path.write_text("[teacher]\nepochs = 3\naugment = true\n")
    assert read_config(path)["teacher"] == {"epochs": 3, "augment": True}
