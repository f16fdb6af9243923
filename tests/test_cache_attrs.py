"""A cache's root attributes are one table, `cache.ATTRS`: each one's type, whether it names the dump
(resume, shards and the pipeline compare those), what an older file without it means, and whether it is
JSON text. The writer, the reader and every "same dump?" check go by it."""

from __future__ import annotations

import json
import shutil

import h5py
import pytest

from kdcache import cache as cache_io
from kdcache.cache import ATTRS, encode, identity, open_cache, required_attrs


def test_a_cache_holds_the_tables_attributes_of_their_types(cache_file):
    with h5py.File(cache_file, "r") as f:
        stored = {k: cache_io._plain(v) for k, v in f.attrs.items()}
    assert set(stored) <= set(ATTRS) and set(required_attrs(2)) <= set(stored)
    for name, value in stored.items():
        spec = ATTRS[name]
        value = json.loads(value) if spec.json else value
        assert isinstance(value, spec.kind) or (spec.kind is float and isinstance(value, int)), name


def test_an_older_cache_without_the_newer_attributes_reads_as_they_mean(tmp_path, cache_file):
    old = tmp_path / "old.h5"
    shutil.copy(cache_file, old)
    newer = ("view_recipe", "data_options", "tta")
    with h5py.File(old, "r+") as f:
        for name in newer:
            del f.attrs[name]
    with open_cache(old) as c, open_cache(cache_file) as new:
        assert identity(c.attrs) == identity(new.attrs)  # the same dump, as the pipeline and resume see it
        assert c.geometry().recipe == new.geometry().recipe and not set(newer) & set(c.attrs)


def test_the_writer_takes_only_the_tables_attributes_and_encodes_the_json_ones():
    assert encode({"classes": ["cat", "dog"], "recipe": {"T": 3.0}, "seed": 0}) == {
        "classes": '["cat", "dog"]',
        "recipe": '{"T": 3.0}',
        "seed": 0,
    }
    assert encode(encode({"data_options": {}})) == {"data_options": "{}"}  # stored text stays as it is
    with pytest.raises(ValueError, match="not in cache.ATTRS"):
        encode({"seed": 0, "temperature": 3.0})


def test_a_dump_that_leaves_out_a_required_attribute_is_a_bug_caught_before_writing(tmp_path, cache_file):
    with open_cache(cache_file) as c:
        attrs = {k: v for k, v in c.attrs.items() if k not in ("seed", "format", "complete")}
    with pytest.raises(ValueError, match=r"\['seed'\]"):
        cache_io.CacheWriter(tmp_path / "c.h5", attrs=attrs, num_rows=400, num_test=0, resume=False)
    assert list(tmp_path.iterdir()) == []
