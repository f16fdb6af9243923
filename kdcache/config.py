"""Training recipes and the named presets that bundle them.

A `Recipe` holds every knob the three stages share. Presets are named recipes;
CLI flags the user actually typed override the preset field by field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from kdcache.errors import KDCacheError
from kdcache.losses import LOSSES
from kdcache.views import MIXES

# Normalisation constants of the two seed notebooks.
SEED_RESNET_MEAN = (0.4914, 0.4822, 0.4465)
SEED_RESNET_STD = (0.2023, 0.1994, 0.2010)
SEED_CNN_MEAN = (0.456, 0.456, 0.406)
SEED_CNN_STD = (0.229, 0.224, 0.225)

TTA_LEVELS = ("none", "flip", "flip-translate")  # test-time augmentation of a model's logits (inference.TTAModel)


def tta_levels(text: str) -> tuple[str, ...]:
    """A recipe's `tta_eval` as the levels it measures: "none" -> (), "flip,flip-translate" -> both."""
    return () if text.strip() == "none" else tuple(level.strip() for level in text.split(","))


def _tta_ok(text: str) -> bool:
    levels = tta_levels(text)
    return bool(levels) and len(set(levels)) == len(levels) and all(lv in TTA_LEVELS[1:] for lv in levels)


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a teacher -> cache -> student run (defaults: the ResNet50 -> ResNet18 recipe)."""

    dataset: str = "cifar10"
    subset: int | None = None
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | linear | constant, stepped every batch
    warmup_epochs: int = 0  # linear warm-up to `lr` before the schedule (0: none)
    nesterov: bool = False  # SGD only
    label_smoothing: float = 0.0  # the label term's targets: (1 - s) one-hot + s / C
    ema: float = 0.0  # decay per step of a weight average used for evaluation, the dump and the checkpoint (0: off)
    bn_bias_lr: float = 1.0  # BatchNorm biases learn at this multiple of lr (their weight decay divided by it)
    augment: bool = True  # pad-4 crop + flip; False: the identity view only
    views: int = 8
    mix: str = "none"  # none | cutmix | mixup | both: mixed views for teacher and cache (function matching)
    mix_prob: float = 1.0  # share of views that are mixed, when mix is not none
    loss: str = "kd"  # kd | dkd | dist | ls: the student's soft-target term
    T: float = 3.0
    alpha: float = 0.5
    # The teacher's test accuracy under test-time augmentation, measured once after training (each level costs
    # passes over the test set: flip 2, flip-translate 6): "none", or levels such as "flip,flip-translate".
    tta_eval: str = "none"
    # The teacher stage's own values of any field above (e.g. its epochs, its arch's lr and batch size), so
    # one preset can carry a teacher recipe and a student recipe; `for_teacher()` applies them.
    teacher: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = SEED_RESNET_MEAN
    std: tuple[float, float, float] = SEED_RESNET_STD
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self)  # immutable and checked once, here: every Recipe in kdcache can train

    def override(self, **values) -> Recipe:
        """A copy with every non-None value replaced (None means: keep the preset's)."""
        return dataclasses.replace(self, **_given(values))

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The recipe an artifact recorded (checkpoint meta, cache attribute); unknown keys ignored. Files
        from before the teacher table held its epochs and augment record them as teacher_epochs and
        teacher_augment: read into the table (where it does not say otherwise, as they were then)."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        teacher = {k: v for old, k in _RECORDED_TEACHER.items() if (v := d.get(old)) is not None}
        fields["teacher"] = {
            **teacher,
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in (d.get("teacher") or {}).items()
                if k in known and k != "teacher"
            },
        }
        return cls(**fields)

    def for_teacher(self) -> Recipe:
        """The recipe the teacher stage trains with: the shared fields, `teacher`'s in their place."""
        return dataclasses.replace(self, **self.teacher, teacher={})

    def override_teacher(self, **values) -> Recipe:
        """A copy whose teacher stage takes every non-None value (flags typed on `kdcache teacher`; the
        pipeline's --teacher-epochs and --teacher-augment)."""
        given = _given(values)
        shared = {k: given.pop(k) for k in ("dataset", "subset", "seed", "teacher_arch") if k in given}
        return dataclasses.replace(self, **shared, teacher={**self.teacher, **given})


_RECORDED_TEACHER = {"teacher_epochs": "epochs", "teacher_augment": "augment"}  # fields of older recipes


def _given(values: dict) -> dict:
    """The values that were given (not None). Asking for several views asks for augmented ones, unless
    augment is given too: K copies of the same plain image would only cost K times the teacher's time."""
    given = {k: v for k, v in values.items() if v is not None}
    if given.get("views", 1) > 1 and "augment" not in given:
        given["augment"] = True
    return given


SCHEDULES = ("cosine", "linear", "constant")


def validate(recipe: Recipe) -> Recipe:
    """Refuse values that cannot train, with a message naming the flag (--subset is checked by the reader);
    the teacher stage's own values too."""
    own = {f.name for f in dataclasses.fields(Recipe)} - {"teacher"}
    unknown = sorted(k for k in recipe.teacher if k not in own)
    if unknown:
        raise KDCacheError(f"the recipe's teacher settings name unknown fields {unknown}: use Recipe's field names")
    _check(recipe)
    if recipe.teacher:
        _check(recipe.for_teacher())
    return recipe


def _check(recipe: Recipe) -> None:
    epochs = recipe.epochs
    numbers = {
        "--lr": recipe.lr,
        "--T": recipe.T,
        "--alpha": recipe.alpha,
        "--mix-prob": recipe.mix_prob,
        "--momentum": recipe.momentum,
        "--weight-decay": recipe.weight_decay,
        "--ema": recipe.ema,
        "--label-smoothing": recipe.label_smoothing,
        "--bn-bias-lr": recipe.bn_bias_lr,
    }
    for flag, value in numbers.items():
        if not math.isfinite(value):
            raise KDCacheError(f"{flag} must be a finite number (got {value})")
    checks = [
        (epochs >= 1, f"--epochs must be >= 1 (got {epochs})"),
        (recipe.batch_size >= 1, f"--batch-size must be >= 1 (got {recipe.batch_size})"),
        (recipe.views >= 1, f"--views must be >= 1 (got {recipe.views})"),
        (recipe.T > 0, f"--T must be > 0 (got {recipe.T})"),
        (0.0 <= recipe.alpha <= 1.0, f"--alpha must be in [0, 1] (got {recipe.alpha})"),
        (recipe.lr > 0, f"--lr must be > 0 (got {recipe.lr})"),
        (0.0 <= recipe.momentum < 1.0, f"--momentum must be in [0, 1) (got {recipe.momentum})"),
        (recipe.weight_decay >= 0, f"--weight-decay must be >= 0 (got {recipe.weight_decay})"),
        (recipe.subset is None or recipe.subset >= 1, f"--subset must be >= 1 (got {recipe.subset})"),
        (recipe.mix in MIXES, f"--mix must be one of {', '.join(MIXES)} (got {recipe.mix!r})"),
        (0.0 <= recipe.mix_prob <= 1.0, f"--mix-prob must be in [0, 1] (got {recipe.mix_prob})"),
        (recipe.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)} (got {recipe.loss!r})"),
        (recipe.optimizer in ("sgd", "adam"), f"--optimizer must be sgd or adam (got {recipe.optimizer!r})"),
        (recipe.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)} (got {recipe.schedule!r})"),
        (0.0 <= recipe.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {recipe.label_smoothing})"),
        (0.0 <= recipe.ema < 1.0, f"--ema must be a decay in [0, 1), e.g. 0.98; 0 turns it off (got {recipe.ema})"),
        (recipe.bn_bias_lr > 0, f"--bn-bias-lr must be > 0 (got {recipe.bn_bias_lr})"),
        (
            recipe.tta_eval == "none" or _tta_ok(recipe.tta_eval),
            f"--tta-eval must be none or a comma list of {', '.join(TTA_LEVELS[1:])}, e.g. flip,flip-translate "
            f"(got {recipe.tta_eval!r})",
        ),
        (
            0 <= recipe.warmup_epochs < epochs,
            f"--warmup-epochs must be in 0..{epochs - 1}, below --epochs (got {recipe.warmup_epochs})",
        ),
        (
            not recipe.nesterov or (recipe.optimizer == "sgd" and recipe.momentum > 0),
            "--nesterov needs --optimizer sgd with momentum (the preset's has none): drop --nesterov or use sgd",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise KDCacheError(message)


# Notebook 2: its two CNNs, Adam 1e-3, 10 epochs, batch 64, no augmentation,
# T=2, soft-target weight 0.25 / CE weight 0.75.
SEED_CNN = Recipe(
    teacher_arch="seed-cnn-teacher",
    student_arch="seed-cnn-student",
    epochs=10,
    batch_size=64,
    lr=1e-3,
    optimizer="adam",
    momentum=0.0,
    weight_decay=0.0,
    schedule="constant",
    augment=False,
    views=1,
    T=2.0,
    alpha=0.25,
    mean=SEED_CNN_MEAN,
    std=SEED_CNN_STD,
)

PRESETS: dict[str, Recipe] = {
    # Notebook 1: ResNet50 -> ResNet18, SGD + cosine, crop + flip, T=3, alpha=0.5.
    "seed-resnet": Recipe(),
    "seed-cnn": SEED_CNN,
    # The README's quick end-to-end job on the first 10,000 real CIFAR-10 images, a few minutes
    # on a 2-core CPU. Distillation pays only when the teacher is well ahead of the student:
    # a quarter-width ResNet-9 (BatchNorm, 4x the seed teacher's training speed on a CPU)
    # trained on crops + flips for 8 epochs labels the plain images; the notebook-2 student
    # alone overfits them in 20 epochs, and the soft targets hold it back from that.
    "demo": SEED_CNN.override(
        subset=10000,
        teacher_arch="resnet9s",
        teacher={"epochs": 8, "augment": True},
        epochs=20,
        schedule="cosine",
        T=2.0,
        alpha=0.5,
    ),
    # A teacher worth distilling, fast: the airbench94 network and recipe (Jordan 2024: 94% on CIFAR-10
    # in ~10 epochs with flip + translate TTA), in kdcache's terms: airbench's lr 11.5 and weight decay
    # 0.0153 per 1,024 images under a summed loss and momentum 0.85 are lr 1.5 and weight decay 1.33e-3
    # for a mean loss at batch 1,024; BatchNorm biases at 64x the lr; label smoothing 0.2; warm-up then
    # linear decay, per step; a weight average (EMA 0.98 per step) in place of its lookahead. 16 epochs
    # (airbench: 9.9 with its alternating flips and 2-pixel translations; kdcache's views are pad-4
    # crops + random flips): on a CPU, seed 0, 12 epochs gave 93.91% and 93.61% with flip + translate
    # TTA (two runs), 16 epochs 94.04%, airbench94's published figure (docs/results.md). The students:
    # notebook 1's ResNet18 with the H200 recipe (SGD lr 0.2 Nesterov, batch 512, 2 warm-up epochs,
    # cosine, 40 epochs) on 40 cached crop/flip views.
    "cifar10-fast": Recipe(
        teacher_arch="airbench94",
        student_arch="resnet18",
        epochs=40,
        batch_size=512,
        lr=0.2,
        nesterov=True,
        warmup_epochs=2,
        views=40,
        T=3.0,
        alpha=0.5,
        teacher={
            "epochs": 16,
            "batch_size": 1024,
            "lr": 1.5,
            "momentum": 0.85,
            "weight_decay": 1.33e-3,
            "schedule": "linear",
            "warmup_epochs": 3,
            "label_smoothing": 0.2,
            "ema": 0.98,
            "bn_bias_lr": 64.0,
        },
    ),
}
DEFAULT_PRESET = "seed-resnet"


def get_preset(name: str | None) -> Recipe:
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise KDCacheError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


DEFAULT_DUMP_BATCH, DEFAULT_BLOCK_ROWS = 512, 1024


@dataclass(frozen=True)
class DumpSettings:
    """The dump's own settings beyond the recipe: how the teacher answers (`tta`), what is kept of its
    answer (`topk` 0: every logit; k: the k largest and the tail's log-sum-exp at `topk_temperatures`,
    () for the default grid) and how the work is cut (`batch_size`, `block_rows`). Recorded in the
    cache; a config file's [dump] table. Checked here, once, whoever builds it."""

    tta: str = "none"
    topk: int = 0
    topk_temperatures: tuple = ()
    batch_size: int = DEFAULT_DUMP_BATCH
    block_rows: int = DEFAULT_BLOCK_ROWS

    def __post_init__(self):
        self.check_values(vars(self))
        for name in ("topk", "batch_size", "block_rows"):  # numpy integers in, plain ints kept
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "topk_temperatures", tuple(float(t) for t in self.topk_temperatures))
        if self.topk_temperatures and not self.topk:
            raise KDCacheError("--topk-temperatures goes with --topk K")

    @staticmethod
    def check_values(values: dict) -> None:
        """Each value's type and range on its own (how topk and its temperatures combine: __post_init__)."""
        import numbers

        for name, value in values.items():
            flag = "--" + name.replace("_", "-")
            if name == "tta":
                if value not in TTA_LEVELS:
                    raise KDCacheError(f"{flag} must be one of {', '.join(TTA_LEVELS)} (got {value!r})")
            elif name == "topk_temperatures":
                if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
                ):
                    raise KDCacheError(f"{flag} must be a list of numbers (got {value!r})")
                if not all(math.isfinite(v) and v > 0 for v in value):
                    raise KDCacheError(f"{flag} must be finite numbers > 0 (got {', '.join(map(str, value))})")
            elif not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise KDCacheError(f"{flag} must be a whole number (got {value!r})")
            elif name == "topk" and value < 0:
                raise KDCacheError(f"{flag} must be >= 1, or 0 for every logit (got {value})")
            elif name != "topk" and value < 1:
                raise KDCacheError(f"{flag} must be >= 1 (got {value})")

    def dump_args(self) -> dict:
        """As `dump.dump_logits`' keyword arguments."""
        return dict(
            tta=self.tta,
            topk=self.topk or None,
            topk_temperatures=self.topk_temperatures or None,
            batch_size=self.batch_size,
            block_rows=self.block_rows,
        )

    @classmethod
    def recorded(cls, attrs) -> DumpSettings:
        """The settings a cache's attributes record (older caches: the defaults where absent)."""
        topk = int(attrs.get("topk", 0) or 0)
        temps = tuple(float(t) for t in attrs.get("lse_temperatures", ())) if topk else ()
        return cls(
            str(attrs.get("tta", "none")),
            topk,
            temps,
            int(attrs.get("batch_size", DEFAULT_DUMP_BATCH)),
            int(attrs.get("block_rows", DEFAULT_BLOCK_ROWS)),
        )


def _in_file(error: KDCacheError, config_path: Path | None, table: str = "") -> KDCacheError:
    """A settings error raised by a config file's values, reworded to name the file and its keys (not flags)."""
    import re

    keys = re.sub(r"--([A-Za-z][\w-]*)", lambda m: table + m[1].replace("-", "_"), str(error))
    return KDCacheError(f"{config_path or 'the config file'}: {keys}")


def dump_settings(config: dict, config_path: Path | None = None, **flags) -> DumpSettings:
    """The dump's settings: each typed flag (None: not typed) > the config file's [dump] table > the default.
    `config` is `read_config`'s, which checked each table value (a bad one names the file and its key);
    a typed --topk 0 (every logit) also drops the table's topk_temperatures, which only a top-k cache has."""
    table = dict(config.get("dump", {}))
    typed = {k: v for k, v in flags.items() if v is not None}
    if table.get("topk_temperatures") and "topk_temperatures" not in typed:
        if "topk" in typed and not typed["topk"]:
            del table["topk_temperatures"]
        elif not {**table, **typed}.get("topk"):
            raise _in_file(KDCacheError("--topk-temperatures goes with --topk K"), config_path, "dump.")
    return DumpSettings(**{**table, **typed})


# ---- config files: a recipe as TOML ------------------------------------------------------------------
# A config file holds Recipe fields: top-level keys are the shared and the students' settings, a
# [teacher] table the teacher stage's own (it replaces the starting recipe's teacher settings whole).
# `preset = "NAME"` picks the starting recipe when --preset is not given. --print-config and
# `kdcache inspect --config` write every field, so a run can be repeated from its artifact alone.

_OPTIONAL = {"subset": int}  # may be None (absent)


def read_config(path: Path | None) -> dict:
    """The checked contents of a config file ({} for None): known keys, values of the field's type,
    `subset = "all"` as None. One-line errors name the file and the key."""
    if path is None:
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KDCacheError(f"{path}: no such config file: pass a TOML file (write one with --print-config)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KDCacheError(f"{path}: cannot read the config file ({e})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KDCacheError(f"{path}: not valid TOML ({e}): see --print-config for the format") from None
    config = {}
    for key, value in raw.items():
        if key == "preset":
            if not isinstance(value, str):
                raise KDCacheError(f"{path}: preset must be a preset name string (got {value!r})")
            if value not in PRESETS:
                raise KDCacheError(f"{path}: unknown preset {value!r}: choose one of {', '.join(PRESETS)}")
            config[key] = value
        elif key == "teacher":
            if not isinstance(value, dict):
                raise KDCacheError(f"{path}: teacher must be a [teacher] table of the teacher stage's settings")
            config[key] = {k: _config_value(path, f"teacher.{k}", k, v) for k, v in value.items()}
        elif key == "dump":
            if not isinstance(value, dict):
                raise KDCacheError(f"{path}: dump must be a [dump] table of the dump's own settings")
            config[key] = {k: _dump_value(path, k, v) for k, v in value.items()}
        elif key == "sweep":
            if not isinstance(value, dict):
                raise KDCacheError(f"{path}: sweep must be a [sweep] table of kdcache sweep's axes")
            config[key] = {k: _sweep_value(path, k, v) for k, v in value.items()}
        else:
            config[key] = _config_value(path, key, key, value)
    return config


SWEEP_KEYS = {
    "T": float,
    "alpha": float,
    "loss": str,
    "seeds": int,
    "arch": str,
    "val_fraction": float,
    "backend": str,
    "keep": str,
}
SWEEP_LISTS = ("T", "alpha", "loss", "seeds", "arch")  # comma lists on the command line, lists in a file


def _sweep_value(path, key: str, value):
    """One [sweep] value as the command line would give it: a list as its comma list ("1,2,4"), a seed
    count as its number; `sweep.SweepSpec` checks the values themselves."""
    import difflib

    if key not in SWEEP_KEYS:
        near = difflib.get_close_matches(key, SWEEP_KEYS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise KDCacheError(f"{path}: [sweep] has no setting {key!r}: {hint}known: {', '.join(SWEEP_KEYS)}")
    kind = SWEEP_KEYS[key]
    items = value if isinstance(value, list) and key in SWEEP_LISTS else [value]
    ok = all(isinstance(v, kind) or (kind is float and isinstance(v, int)) for v in items)
    if not ok or any(isinstance(v, bool) for v in items):
        what = f"a list of {kind.__name__}" if key in SWEEP_LISTS else kind.__name__
        raise KDCacheError(f"{path}: sweep.{key} must be {what} (got {value!r})")
    if key in SWEEP_LISTS:
        return ",".join(str(v) for v in items) + ("," if isinstance(value, list) and len(items) == 1 else "")
    return value


def _dump_value(path, key: str, value):
    """One checked [dump] value: a field of `DumpSettings`, of its type and in its range."""
    import difflib

    kinds = {f.name: type(f.default) for f in dataclasses.fields(DumpSettings)}
    if key not in kinds:
        close = difflib.get_close_matches(key, list(kinds), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the keys are {', '.join(kinds)}"
        raise KDCacheError(f"{path}: unknown key 'dump.{key}': {hint}")
    try:
        DumpSettings.check_values({key: value})
    except KDCacheError as e:
        raise _in_file(e, path, "dump.") from None
    return tuple(float(v) for v in value) if kinds[key] is tuple else value


def _config_value(path, where: str, key: str, value):
    import difflib

    types = {f.name: type(f.default) for f in dataclasses.fields(Recipe) if f.name != "teacher"}
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see --print-config for the keys"
        if key in _RECORDED_TEACHER:
            hint = f"the teacher's {_RECORDED_TEACHER[key]} goes in the [teacher] table: {_RECORDED_TEACHER[key]} = ..."
        raise KDCacheError(f"{path}: unknown key {where!r}: {hint}")
    kind = _OPTIONAL.get(key) or types[key]
    if key == "subset" and value == "all":
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        if len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
        kind_name = "a list of 3 numbers"
    elif type(value) is kind:
        return value
    else:
        kind_name = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            str: "a string",
            tuple: "a list of 3 numbers",
        }[kind]
    extra = ' or "all"' if key == "subset" else ""
    raise KDCacheError(f"{path}: {where} must be {kind_name}{extra} (got {value!r})")


def resolve(
    preset: str | None,
    config: dict,
    recorded: dict | None,
    flags: dict,
    *,
    teacher_stage: bool = False,
    config_path: Path | None = None,
) -> Recipe:
    """The one recipe resolver: flags > config file > the starting recipe, which is --preset (or the
    file's preset), else the recipe the upstream artifact recorded, else the default preset.
    `flags`: the command's recipe flags (None: not typed); on `kdcache teacher` they are the teacher
    stage's own settings (`override_teacher`). The file's values are checked (against the starting
    recipe) before any flag applies, so a bad value names the file and its key."""
    name = preset or config.get("preset")
    if name is not None or not recorded:
        base = get_preset(name)
    else:
        base = Recipe.from_dict(recorded)
    fields = _given({k: v for k, v in config.items() if k not in ("preset", "teacher", "dump", "sweep")})
    if "teacher" in config:  # the file's teacher settings are the whole story
        fields["teacher"] = dict(config["teacher"])
    if "subset" in config:
        fields["subset"] = config["subset"]  # "all" (None) is a value, not "keep the preset's"
    if config:
        try:  # one replace: the file's values are checked together, never half applied
            base = dataclasses.replace(base, **fields)
        except KDCacheError as e:
            raise _in_file(e, config_path) from None
    return base.override_teacher(**flags) if teacher_stage else base.override(**flags)


def teacher_views(recipe: Recipe, taught: dict | None, **given) -> Recipe:
    """The view family the teacher trained on (`taught`: the recipe its checkpoint recorded; crop/flip
    or not, its mix and mix share) wherever the command's own flag (`given`, None: not passed) leaves
    it open, whatever --preset says: a dump and an online student run the teacher on the kind of
    image it learned from. No recorded recipe (an imported teacher) leaves the recipe as it is."""
    if not taught:
        return recipe
    recorded = Recipe.from_dict(taught)
    known = {k for k in given if k in taught or k in recorded.teacher}
    resolved = recorded.for_teacher()  # the teacher stage's own settings where it had them
    return dataclasses.replace(
        recipe, **{k: getattr(resolved, k) for k, v in given.items() if v is None and k in known}
    )


def config_given(config: dict, **flags) -> dict:
    """Each flag's value, or the config file's where the flag was not typed (None: neither gave it)."""
    return {k: v if v is not None else config.get(k) for k, v in flags.items()}


def fixed_by(source: Path, **typed: tuple) -> None:
    """Settings an upstream artifact fixes (`--flag_name=(typed, recorded)`): a flag that repeats the
    artifact's value is accepted, one that differs is refused naming both values."""
    for name, (value, recorded) in typed.items():
        flag = "--" + name.replace("_", "-")
        if value is not None and value != recorded:
            raise KDCacheError(
                f"{flag} {value} differs from {source}, which has {recorded}: it is fixed by that file; "
                f"drop {flag}, or make the file again with it"
            )


def to_toml(recipe: Recipe, *, header: str = "", dump: DumpSettings | None = None, sweep: dict | None = None) -> str:
    """The recipe as a config file, every field written (`subset = "all"` for no subset; the teacher
    stage's own settings as a [teacher] table), so reading it back gives the same recipe; with `dump`,
    also the dump's own settings as a [dump] table."""
    lines = [f"# {line}" for line in header.splitlines()]
    for f in dataclasses.fields(Recipe):
        value = getattr(recipe, f.name)
        if f.name == "teacher":
            continue
        lines.append(f"{f.name} = {_toml_value('all' if f.name == 'subset' and value is None else value)}")
    lines += ["", "[teacher]  # the teacher stage's own settings (the others as above)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in recipe.teacher.items()]
    if dump is not None:
        lines += [
            "",
            "[dump]  # dump-logits' own settings (topk 0: every logit; topk_temperatures []: the default grid)",
        ]
        lines += [f"{f.name} = {_toml_value(getattr(dump, f.name))}" for f in dataclasses.fields(DumpSettings)]
    if sweep is not None:
        lines += ["", "[sweep]  # kdcache sweep's axes (lists) and its own settings"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in sweep.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
