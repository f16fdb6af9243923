"""Training recipes and the named presets that bundle them.

A `Recipe` holds every knob the three stages share. Presets are named recipes;
CLI flags the user actually typed override the preset field by field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kdcache.errors import KDCacheError
from kdcache.losses import LOSSES
from kdcache.views import MIXES

# Normalisation constants of the two seed notebooks.
SEED_RESNET_MEAN = (0.4914, 0.4822, 0.4465)
SEED_RESNET_STD = (0.2023, 0.1994, 0.2010)
SEED_CNN_MEAN = (0.456, 0.456, 0.406)
SEED_CNN_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a teacher -> cache -> student run (defaults: notebook 1)."""

    dataset: str = "cifar10"
    subset: int | None = None
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    epochs: int = 200
    teacher_epochs: int | None = None  # None: same as `epochs`
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
    teacher_augment: bool | None = None  # the teacher's own training views (None: same as augment)
    views: int = 8
    mix: str = "none"  # none | cutmix | mixup | both: mixed views for teacher and cache (function matching)
    mix_prob: float = 1.0  # share of views that are mixed, when mix is not none
    loss: str = "kd"  # kd | dkd | dist | ls: the student's soft-target term
    T: float = 3.0
    alpha: float = 0.5
    # The teacher stage's own values of any field above (e.g. its arch's lr and batch size), so one
    # preset can carry a teacher recipe and a student recipe; `for_teacher()` applies them.
    teacher: dict = field(default_factory=dict)
    mean: tuple[float, float, float] = SEED_RESNET_MEAN
    std: tuple[float, float, float] = SEED_RESNET_STD
    seed: int = 0

    def override(self, **values) -> "Recipe":
        """A copy with every non-None value replaced (None means: keep the preset's).

        Asking for several views asks for augmented ones, unless augment is set too:
        K copies of the same plain image would only cost K times the teacher's time.
        """
        if (values.get("views") or 1) > 1 and values.get("augment") is None:
            values["augment"] = True
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """The recipe an artifact recorded (checkpoint meta, cache attribute); unknown keys ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        fields["teacher"] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.get("teacher", {}).items()
                             if k in known and k != "teacher"}  # fmt: skip
        return cls(**fields)

    def for_teacher(self) -> "Recipe":
        """The recipe the teacher stage trains with: `teacher`'s fields, epochs and augment resolved."""
        own = {k: v for k, v in self.teacher.items() if k not in ("epochs", "augment")}
        return dataclasses.replace(self, **own, epochs=self.teacher_recipe_epochs, augment=self.teacher_recipe_augment,
                                   teacher_epochs=None, teacher_augment=None, teacher={})  # fmt: skip

    def override_teacher(self, **values) -> "Recipe":
        """A copy whose teacher stage takes every non-None value (flags typed on `kdcache teacher`)."""
        if (values.get("views") or 1) > 1 and values.get("augment") is None:
            values["augment"] = True
        given = {k: v for k, v in values.items() if v is not None}
        shared = {k: given.pop(k) for k in ("dataset", "subset", "seed", "teacher_arch") if k in given}
        return dataclasses.replace(self, **shared, teacher={**self.teacher, **given})

    @property
    def teacher_recipe_epochs(self) -> int:
        if "epochs" in self.teacher:
            return self.teacher["epochs"]
        return self.teacher_epochs if self.teacher_epochs is not None else self.epochs

    @property
    def teacher_recipe_augment(self) -> bool:
        if "augment" in self.teacher:
            return self.teacher["augment"]
        return self.teacher_augment if self.teacher_augment is not None else self.augment


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
    "demo": SEED_CNN.override(subset=10000, teacher_arch="resnet9s", teacher_epochs=8, teacher_augment=True,
                              epochs=20, schedule="cosine", T=2.0, alpha=0.5),
    # A teacher worth distilling, fast: the airbench94 network and recipe (Jordan 2024: 94% on CIFAR-10
    # in ~10 epochs with flip + translate TTA), in kdcache's terms: airbench's lr 11.5 and weight decay
    # 0.0153 per 1,024 images under a summed loss and momentum 0.85 are lr 1.5 and weight decay 1.33e-3
    # for a mean loss at batch 1,024; BatchNorm biases at 64x the lr; label smoothing 0.2; warm-up then
    # linear decay, per step; a weight average (EMA 0.98 per step) in place of its lookahead. 12 epochs
    # (airbench: 9.9 with its alternating flips and 2-pixel translations; kdcache's views are pad-4
    # crops + random flips). The students: notebook 1's ResNet18 with the H200 recipe (SGD lr 0.2
    # Nesterov, batch 512, 2 warm-up epochs, cosine, 40 epochs) on 40 cached crop/flip views.
    "cifar10-fast": Recipe(
        teacher_arch="airbench94", student_arch="resnet18", epochs=40, batch_size=512, lr=0.2, nesterov=True,
        warmup_epochs=2, views=40, T=3.0, alpha=0.5,
        teacher={"epochs": 12, "batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": 1.33e-3,
                 "schedule": "linear", "warmup_epochs": 3, "label_smoothing": 0.2, "ema": 0.98, "bn_bias_lr": 64.0},
    ),
}
DEFAULT_PRESET = "seed-resnet"


def get_preset(name: str | None) -> Recipe:
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise KDCacheError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


SCHEDULES = ("cosine", "linear", "constant")


def validate(recipe: Recipe) -> Recipe:
    """Refuse values that cannot train, with a message naming the flag (--subset is checked by the reader);
    the teacher stage's own values too."""
    own = {f.name for f in dataclasses.fields(Recipe)} - {"teacher", "teacher_epochs", "teacher_augment"}
    unknown = sorted(k for k in recipe.teacher if k not in own)
    if unknown:
        raise KDCacheError(f"the recipe's teacher settings name unknown fields {unknown}: use Recipe's field names")
    _check(recipe)
    if recipe.teacher or recipe.teacher_epochs is not None:
        _check(recipe.for_teacher())
    return recipe


def _check(recipe: Recipe) -> None:
    epochs = recipe.epochs
    numbers = {"--lr": recipe.lr, "--T": recipe.T, "--alpha": recipe.alpha, "--mix-prob": recipe.mix_prob,
               "--momentum": recipe.momentum, "--weight-decay": recipe.weight_decay, "--ema": recipe.ema,
               "--label-smoothing": recipe.label_smoothing, "--bn-bias-lr": recipe.bn_bias_lr}  # fmt: skip
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
        (0 <= recipe.warmup_epochs < epochs, f"--warmup-epochs must be in 0..{epochs - 1}, below --epochs (got {recipe.warmup_epochs})"),
        (not recipe.nesterov or (recipe.optimizer == "sgd" and recipe.momentum > 0),
         "--nesterov needs --optimizer sgd with momentum (the preset's has none): drop --nesterov or use sgd"),
    ]
    for ok, message in checks:
        if not ok:
            raise KDCacheError(message)
