"""The student's recipe policy lives in one function, `stages.student_recipe`: `kdcache student`, the
library's `train_student(None, ...)` and anything that varies a resolved recipe (a sweep) start from it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import pytest
from typer.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cli import app
from kdcache.config import PRESETS, to_toml
from kdcache.errors import KDCacheError
from kdcache.stages import cache_fixes, check_served, student_recipe


def test_the_command_prints_the_recipe_the_function_resolves(cache_file, data_dir):
    for preset, typed in ((None, []), ("seed-resnet", ["--T", "2", "--seed", "3"])):
        args = ["student", "--cache", str(cache_file), "--data-dir", str(data_dir), "--print-config", *typed]
        result = CliRunner().invoke(app, [*args, *(["--preset", preset] if preset else [])])
        assert result.exit_code == 0, result.output
        recipe = student_recipe(cache_file, preset, {}, {"T": 2.0, "seed": 3} if typed else {})
        header = "kdcache student: the resolved recipe (use it with --config FILE)"
        assert result.stdout == to_toml(recipe, header=header)


def test_the_cache_fixes_its_views_and_normalisation_whatever_the_preset(cache_file):
    recipe = student_recipe(cache_file, "seed-resnet", {}, {"alpha": 0.9})
    with open_cache(cache_file) as c:
        attrs = c.attrs
    assert PRESETS["seed-resnet"].views == 8 and recipe.views == attrs["num_views"] == 4
    assert recipe.mean == tuple(attrs["normalize_mean"]) and recipe.mix == "none" and recipe.alpha == 0.9
    assert recipe.subset is None  # the cache's rows
    assert cache_fixes(recipe, attrs) == recipe
    varied = dataclasses.replace(recipe, T=1.0, alpha=0.0, seed=7)  # what a sweep does with it
    assert varied.views == 4 and varied.student_arch == recipe.student_arch


@pytest.mark.parametrize(
    "flags, needle",
    [({"views": 9}, "--views 9 differs from"), ({"mix": "cutmix"}, "--mix goes with --online-teacher")],
)
def test_what_the_cache_fixes_cannot_be_changed(cache_file, flags, needle):
    with pytest.raises(KDCacheError, match=needle):
        student_recipe(cache_file, None, {}, flags)


def test_a_top_k_cache_serves_kd_at_its_temperatures_only():
    attrs = {"topk": 3, "lse_temperatures": [1.0, 2.0]}
    recipe = PRESETS["seed-cnn"]
    check_served(dataclasses.replace(recipe, T=2.0), attrs, "c.h5")
    check_served(dataclasses.replace(recipe, T=5.0, alpha=0.0), attrs, "c.h5")  # no soft targets used
    check_served(dataclasses.replace(recipe, T=5.0), {"topk": 0}, "c.h5")  # a dense cache serves any T
    with pytest.raises(KDCacheError, match="at T = 1, 2 only, not at --T 5"):
        check_served(dataclasses.replace(recipe, T=5.0), attrs, "c.h5")
    with pytest.raises(KDCacheError, match="--loss dkd needs every logit"):
        check_served(dataclasses.replace(recipe, T=2.0, loss="dkd"), attrs, "c.h5")


def test_a_recorded_student_architecture_naming_code_needs_trust(tmp_path, cache_file):
    crafted = tmp_path / "cache.h5"
    shutil.copy(cache_file, crafted)
    with h5py.File(crafted, "r+") as f:
        f.attrs["recipe"] = json.dumps({**json.loads(f.attrs["recipe"]), "student_arch": "evil_module:factory"})
    with pytest.raises(KDCacheError, match="the recipe recorded in .* pass --arch evil_module:factory"):
        student_recipe(crafted, None, {}, {})
    assert student_recipe(crafted, None, {}, {}, trust_arch=True).student_arch == "evil_module:factory"
    assert student_recipe(crafted, None, {}, {"student_arch": "resnet18"}).student_arch == "resnet18"
