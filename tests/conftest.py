"""Shared fixtures: a generated CIFAR-10-layout dataset, a tiny trained teacher and its cache.

Everything is built once per session through the real code paths, on CPU, in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import TINY

from kdcache.data import write_fake_cifar10
from kdcache.dump import dump_logits
from kdcache.runtime import Runtime
from kdcache.stages import train_teacher

# One thread in tests (helpers.THREAD_ENV does it for their subprocesses): timings stay predictable
# on a shared 2-core machine (two oversubscribed torch thread pools run 10x slower), and runs
# compared bit for bit use the same thread count.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _store_dir(tmp_path_factory):
    """Image-folder stores go to a temporary folder, never ~/.cache (subprocesses inherit it)."""
    os.environ["KDCACHE_STORE_DIR"] = str(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="session")
def cpu() -> Runtime:
    return Runtime.create("cpu", "fp32")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar10(root, num_train=1000)
    return root


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory, data_dir, cpu) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    train_teacher(TINY, data_dir=data_dir, out=out, rt=cpu)
    return out


@pytest.fixture(scope="session")
def cache_file(tmp_path_factory, data_dir, teacher_ckpt, cpu) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=out,
        views=4,
        seed=0,
        batch_size=128,
        rt=cpu,
        subset=400,
        augment=True,
        block_rows=128,
    )
    return out
