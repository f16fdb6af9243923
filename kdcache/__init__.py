"""kdcache: knowledge distillation from cached teacher logits.

The command line is `kdcache --help`; the library is this package's names, imported on first use
(`import kdcache` alone loads no torch): see docs/python-api.md.
"""

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    "CachedBatches": "kdcache.api",
    "train_teacher": "kdcache.api",
    "dump_logits": "kdcache.api",
    "train_student": "kdcache.api",
    "sweep": "kdcache.api",
    "Recipe": "kdcache.config",
    "get_preset": "kdcache.config",
    "PRESETS": "kdcache.config",
    "DumpSettings": "kdcache.config",
    "Views": "kdcache.views",
    "render_views": "kdcache.views",
    "Runtime": "kdcache.runtime",
    "Batch": "kdcache.batches",
    "open_cache": "kdcache.cache",
    "student_loss": "kdcache.losses",
    "kd_loss": "kdcache.losses",
    "soft_loss": "kdcache.losses",
    "label_loss": "kdcache.losses",
    "build_model": "kdcache.models",
    "load_checkpoint": "kdcache.checkpoints",
    "KDCacheError": "kdcache.errors",
}
_RENAMED = {"build_model": "build"}  # public name -> its name in the module

# every name of _EXPORTS, and the version
__all__ = [
    "PRESETS",
    "Batch",
    "CachedBatches",
    "DumpSettings",
    "KDCacheError",
    "Recipe",
    "Runtime",
    "Views",
    "__version__",
    "build_model",
    "dump_logits",
    "get_preset",
    "kd_loss",
    "label_loss",
    "load_checkpoint",
    "open_cache",
    "render_views",
    "soft_loss",
    "student_loss",
    "sweep",
    "train_student",
    "train_teacher",
]


def __getattr__(name: str):
    """PEP 562: import the module that defines `name` when it is first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
