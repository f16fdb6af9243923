"""The Typer app: flags, rich progress and tables, errors to exit codes. No training logic here."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
from pathlib import Path

import typer

from kdcache.artifacts import atomic_write_text, claim_output
from kdcache.config import (
    DEFAULT_PRESET,
    PRESETS,
    Recipe,
    config_given,
    dump_settings,
    fixed_by,
    read_config,
    resolve,
    teacher_views,
)
from kdcache.errors import KDCacheError
from kdcache.present import (
    RichProgress,
    err_console,
    out_console,
    print_bench,
    print_cache_summary,
    print_epoch,
    print_eval,
    print_folder_bench,
    print_imported,
    print_pipeline,
    print_procs_bench,
    print_verify,
    print_warnings,
    report_table,
    stage_summary,
    warn_weak_teacher,
)

app = typer.Typer(
    help=(
        "Knowledge distillation with cached teacher logits.\n\n"
        "Train a teacher once, cache its logits for K augmented views of every training image, "
        "then train any number of students against the cache, without the teacher in the loop:\n\n"
        "  kdcache teacher  ->  kdcache dump-logits --views 8  ->  kdcache student --T 3 --alpha 0.5"
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

TEACHER_OUT = Path("saved_models/teacher.pt")
CACHE_OUT = Path("saved_models/teacher_logits.h5")
STUDENT_OUT = Path("saved_models/student.pt")
SWEEP_OUT = Path("runs/sweep")
PRESET_NAMES = ", ".join(PRESETS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so writers close and locks go as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def command(name: str | None = None, **kwargs):
    """`app.command` that turns KDCacheError into one line on stderr and exit code 2, and
    Ctrl-C or SIGTERM into a clean stop (exit 130 or 143) that keeps resumable work."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            signal.signal(signal.SIGTERM, _on_sigterm)
            try:
                return fn(*args, **kw)
            except KDCacheError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt as e:
                typer.echo("interrupted: partial work is kept; rerun the same command with --resume", err=True)
                raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

        return app.command(name, **kwargs)(run)

    return decorate


# ---- shared options -----------------------------------------------------------------------------

PresetOpt = typer.Option(
    None,
    "--preset",
    help=(
        f"Named recipe: {PRESET_NAMES}. Flags you pass override it. \\[default: {DEFAULT_PRESET} for teacher and "
        "pipeline; dump-logits and student start from the recipe the teacher/cache recorded]"
    ),
)
DataDirOpt = typer.Option(
    None,
    "--data-dir",
    "--data",
    help=(
        "Where the data is: CIFAR's python batches (\\[default: data/]) or an image folder (\\[default: the path "
        "the checkpoint or cache recorded])."
    ),
)
DatasetOpt = typer.Option(
    None,
    "--dataset",
    help="cifar10 | cifar100 | imagefolder (implied by --data PATH with a train/ folder). \\[default: cifar10]",
)
ImageSizeOpt = typer.Option(
    None,
    "--image-size",
    help="Image folders: side of a view in pixels, 8..255 (64 trains fast on a CPU). \\[default: 224]",
)
StoreSizeOpt = typer.Option(
    None,
    "--store-size",
    help=(
        "Image folders: images are stored once, shrunk to fit this many pixels a side. "
        "\\[default: image size x 4/3 / 0.875, rounded up to 8: 104 for 64, 344 for 224]"
    ),
)
ValFractionOpt = typer.Option(
    None,
    "--val-fraction",
    help=(
        "Image folders without val/: hold out this share of every class of train/ (chosen by a hash of the file path)."
    ),
)
SkipBadOpt = typer.Option(
    False,
    "--skip-bad-images",
    help=(
        "Image folders: leave out files that do not decode or are too large (named in a note and in the store's "
        "meta.json) instead of stopping."
    ),
)
MaxPixelsOpt = typer.Option(
    None,
    "--max-image-pixels",
    help=(
        "Image folders: refuse (or with --skip-bad-images leave out) an image whose header declares more pixels "
        "than this, before decoding it: a small file can declare a huge canvas. \\[default: 40000000, 40 megapixels]"
    ),
)
ResidentOpt = typer.Option(
    None,
    "--resident-mb",
    help=(
        "Image folders: training images up to this many MB stay on the device; "
        "a larger store is streamed from host memory per batch (same results). A student's cached targets "
        "over this many MB are read from the cache one epoch ahead. "
        "\\[default: half the GPU's free memory, or half the RAM]"
    ),
)
StoreFormatOpt = typer.Option(
    None,
    "--store-format",
    help=(
        "Image folders: how the store keeps each image: raw (uint8 pixels, read by memory map: fastest, biggest), "
        "jpeg (JPEG bytes, about a tenth of raw, decoded per batch on all cores) "
        "or auto (raw while the raw store fits in half the RAM, jpeg beyond). \\[default: auto]"
    ),
)
JpegQualityOpt = typer.Option(
    None, "--jpeg-quality", help="Image folders, jpeg store: JPEG quality of the stored images. \\[default: 90]"
)
RebuildStoreOpt = typer.Option(
    False,
    "--rebuild-store",
    help=(
        "Image folders: prepare the store again, whatever its state: after the folder changed (artifacts of the old "
        "store no longer match), or when it is damaged."
    ),
)
SubsetOpt = typer.Option(
    None, "--subset", help="Use only the first N training images. \\[default: all, or the preset's]"
)
SeedOpt = typer.Option(None, "--seed", help="Seed for initialisation, views and order. \\[default: 0]")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: cuda when available).")
PrecisionOpt = typer.Option(
    "auto", "--precision", help="auto | fp32 | bf16 (auto: bf16 autocast on cuda, fp32 on cpu)."
)
CompileOpt = typer.Option(False, "--compile", help="torch.compile the model (pays off on long CUDA runs).")
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing output (or discard an interrupted run's state).")
ResumeOpt = typer.Option(
    False, "--resume", help="Continue an interrupted run of the same command from its last saved point."
)
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs. \\[default: the preset's, 200 for seed-resnet]")
BatchOpt = typer.Option(
    None, "--batch-size", help="Training batch size. \\[default: the preset's, 128 for seed-resnet]"
)
LrOpt = typer.Option(None, "--lr", help="Peak learning rate. \\[default: the preset's, 0.1 (SGD) for seed-resnet]")
OptimOpt = typer.Option(
    None,
    "--optimizer",
    help=(
        "sgd | adam; momentum and weight decay stay the preset's. \\[default: the preset's: sgd for seed-resnet, "
        "adam for seed-cnn]"
    ),
)
WarmupOpt = typer.Option(
    None,
    "--warmup-epochs",
    help="Epochs of linear warm-up to --lr before the schedule starts. \\[default: the preset's, 0]",
)
NesterovOpt = typer.Option(
    None, "--nesterov/--no-nesterov", help="Nesterov momentum (SGD). \\[default: the preset's, off]"
)
MixOpt = typer.Option(
    None,
    "--mix",
    help=(
        "Mixed views (function matching): none | cutmix | mixup | both; the partner image and box or weight are a "
        "pure function of (seed, image, view). \\[default: the preset's, none]"
    ),
)
MixProbOpt = typer.Option(
    None,
    "--mix-prob",
    help="Share of views that are mixed, in [0, 1]. \\[default: the preset's, 1; dump-logits: the teacher's]",
)
LossOpt = typer.Option(
    None,
    "--loss",
    help=(
        "Soft-target loss from raw logits: kd (Hinton) | dkd (decoupled KD) | dist (DIST) "
        "| ls (logit standardisation). \\[default: kd]"
    ),
)
ScheduleOpt = typer.Option(
    None,
    "--schedule",
    help=(
        "Learning rate over the epochs, set every step: cosine (decays to 0) | linear (decays to 0) | constant. "
        "\\[default: the preset's: cosine for seed-resnet, constant for seed-cnn]"
    ),
)
MomentumOpt = typer.Option(
    None, "--momentum", help="SGD momentum in [0, 1). \\[default: the preset's, 0.9 for seed-resnet]"
)
WeightDecayOpt = typer.Option(
    None, "--weight-decay", help="L2 weight decay (>= 0). \\[default: the preset's, 5e-4 for seed-resnet]"
)
LabelSmoothingOpt = typer.Option(
    None,
    "--label-smoothing",
    help=(
        "Label smoothing of the label term, in [0, 1): targets (1 - s) one-hot + s / classes. "
        "\\[default: the preset's, 0; cifar10-fast's teacher 0.2]"
    ),
)
EmaOpt = typer.Option(
    None,
    "--ema",
    help=(
        "Keep an exponential moving average of the weights (this decay per step, e.g. 0.98; 0: off); evaluation, "
        "the checkpoint and so the dump use the average. \\[default: the preset's, 0]"
    ),
)
BnBiasLrOpt = typer.Option(
    None,
    "--bn-bias-lr",
    help=(
        "BatchNorm biases learn at this multiple of --lr (their weight decay divided by it, as airbench does). "
        "\\[default: the preset's, 1]"
    ),
)
ConfigOpt = typer.Option(
    None,
    "--config",
    help=(
        "A TOML file of recipe fields, e.g. `lr = 0.05`, with a \\[teacher] table for the teacher stage's own "
        "(write one with --print-config, or from any checkpoint or cache with `kdcache inspect FILE --config`). "
        "Flags you type override it; it overrides the starting recipe (--preset, its own `preset = NAME`, "
        "or what the upstream artifact recorded)."
    ),
)
PrintConfigOpt = typer.Option(
    False,
    "--print-config",
    help="Print the resolved recipe as a TOML config file and exit: nothing is trained or written.",
)
FixedDatasetOpt = typer.Option(
    None,
    "--dataset",
    help="Fixed by the teacher (or cache): accepted when it names the same dataset, refused otherwise.",
)
FixedImageSizeOpt = typer.Option(
    None, "--image-size", help="Fixed by the teacher (or cache): accepted when it is the same size, refused otherwise."
)
TensorBoardOpt = typer.Option(
    None,
    "--tensorboard",
    help=(
        "Also write each epoch's metrics (the lines of OUT.metrics.jsonl: train loss, train and test accuracy, lr, "
        "img/s, a student's agreement and KL with the teacher, a teacher's TTA accuracies at the end) "
        "as TensorBoard scalars into this folder, the epoch as the step; view them with `tensorboard --logdir DIR`. "
        "Needs pip install 'kdcache\\[tensorboard]'."
    ),
    metavar="DIR",
)
TtaEvalOpt = typer.Option(
    None,
    "--tta-eval",
    help=(
        "After training, also measure the teacher's test accuracy with test-time augmentation: a comma list of "
        "flip (2 passes over the test set) and flip-translate (6 passes), e.g. flip,flip-translate; kept in the "
        "checkpoint's metrics and shown in the summary. `kdcache eval CKPT --tta LEVEL` measures it later. "
        "\\[default: none, or the preset's]"
    ),
    metavar="LEVELS",
)
TrustArchOpt = typer.Option(
    False,
    "--trust-arch",
    help=(
        "Build a module.path:factory architecture that a checkpoint or cache names: "
        "that imports the module and runs its code, so only for files you trust. "
        "kdcache's own names and torchvision:/timm: specs need no flag."
    ),
)


CacheOpt = typer.Option(CACHE_OUT, "--cache", help="Logit cache written by `kdcache dump-logits`.")
CacheSubsetOpt = typer.Option(None, "--subset", help="Must match the cache's; \\[default: the cache's]")
TRAINING = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "schedule",
    "warmup_epochs",
    "nesterov",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "ema",
)  # the training flags every training command takes, under these names


def _training(scope: dict) -> dict:
    """The training flags a command was given (its `locals()`), for the recipe resolver."""
    return {k: scope[k] for k in TRAINING}


def _print_config(recipe, command: str, dump=None) -> None:
    """--print-config: the resolved recipe (and the dump's own settings) as TOML on stdout, then exit 0
    before any work."""
    from kdcache.config import to_toml

    typer.echo(
        to_toml(recipe, header=f"kdcache {command}: the resolved recipe (use it with --config FILE)", dump=dump),
        nl=False,
    )
    raise typer.Exit(0)


def _file_arch(spec: str | None, typed: str | None, config: Path | None, flag: str = "--arch") -> None:
    """An architecture that only the config file names runs no code unless the command line names it."""
    from kdcache.models import refuse_code

    if spec is not None and typed is None:
        refuse_code(spec, str(config), f"name it on the command line ({flag} {spec}) if you trust that code")


def _data_options(
    dataset: str | None,
    data_dir: Path | None,
    image_size,
    store_size,
    val_fraction,
    skip_bad,
    max_pixels,
    rebuild,
    store_format=None,
    jpeg_quality=None,
) -> tuple[str | None, dict]:
    """The dataset (a folder with train/ is an image folder) and its store options, checked."""
    if dataset is None and data_dir is not None and (data_dir / "train").is_dir():
        dataset = "imagefolder"
    given = {
        "--image-size": image_size,
        "--store-size": store_size,
        "--val-fraction": val_fraction,
        "--skip-bad-images": skip_bad or None,
        "--max-image-pixels": max_pixels,
        "--store-format": store_format,
        "--jpeg-quality": jpeg_quality,
    }
    if dataset != "imagefolder" and (flag := next((f for f, v in given.items() if v is not None), None)):
        raise KDCacheError(
            f"{flag} applies to image folders: pass --data PATH, a folder with train/<class>/ image folders"
        )
    if dataset == "imagefolder" and data_dir is None:
        raise KDCacheError("--dataset imagefolder needs --data PATH, a folder with train/<class>/ image folders")
    options = {
        "image_size": image_size,
        "store_size": store_size,
        "val_fraction": val_fraction,
        "skip_bad_images": skip_bad,
        "max_image_pixels": max_pixels,
        "rebuild_store": rebuild,
        "store_format": store_format,
        "jpeg_quality": jpeg_quality,
    }
    return dataset, options if dataset == "imagefolder" else {}


def _runtime(device: str, precision: str, compile: bool, resident_mb: float | None = None, distributed: bool = False):
    """The runtime; `distributed`: the command may run under torchrun (teacher and student train with DDP)."""
    import os

    from kdcache.runtime import Runtime

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed:
        raise KDCacheError(
            "this command runs in one process: start it without torchrun (teacher and student train under torchrun)"
        )
    return Runtime.create(device, precision, compile, resident_mb)


# ---- commands -----------------------------------------------------------------------------------


@command("teacher")
def teacher_cmd(
    preset: str | None = PresetOpt,
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=(
            "Teacher architecture: resnet18|34|50, resnet9s, airbench94|95, seed-cnn-teacher, torchvision:NAME, "
            "timm:NAME or module.path:factory. \\[default: resnet50]"
        ),
    ),
    dataset: str | None = DatasetOpt,
    data_dir: Path | None = DataDirOpt,
    image_size: int | None = ImageSizeOpt,
    store_size: int | None = StoreSizeOpt,
    val_fraction: float | None = ValFractionOpt,
    skip_bad_images: bool = SkipBadOpt,
    max_image_pixels: int | None = MaxPixelsOpt,
    rebuild_store: bool = RebuildStoreOpt,
    store_format: str | None = StoreFormatOpt,
    jpeg_quality: int | None = JpegQualityOpt,
    resident_mb: float | None = ResidentOpt,
    subset: int | None = SubsetOpt,
    epochs: int | None = EpochsOpt,
    batch_size: int | None = BatchOpt,
    lr: float | None = LrOpt,
    optimizer: str | None = OptimOpt,
    schedule: str | None = ScheduleOpt,
    warmup_epochs: int | None = WarmupOpt,
    nesterov: bool | None = NesterovOpt,
    momentum: float | None = MomentumOpt,
    weight_decay: float | None = WeightDecayOpt,
    label_smoothing: float | None = LabelSmoothingOpt,
    ema: float | None = EmaOpt,
    bn_bias_lr: float | None = BnBiasLrOpt,
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="Random pad-4 crop + flip each epoch. \\[default: the preset's]"
    ),
    mix: str | None = MixOpt,
    mix_prob: float | None = MixProbOpt,
    seed: int | None = SeedOpt,
    tta_eval: str | None = TtaEvalOpt,
    config: Path | None = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    out: Path = typer.Option(
        TEACHER_OUT, "--out", help="Checkpoint to write (metrics go beside it as OUT.metrics.jsonl)."
    ),
    tensorboard: Path | None = TensorBoardOpt,
    force: bool = ForceOpt,
    resume: bool = ResumeOpt,
):
    """Train the teacher and save a self-describing checkpoint (arch, classes, data fingerprint, metrics)."""
    from kdcache import tblog
    from kdcache.models import check_spec
    from kdcache.stages import train_teacher

    cfg = read_config(config)
    dataset, data_options = _data_options(
        dataset or cfg.get("dataset"),
        data_dir,
        image_size,
        store_size,
        val_fraction,
        skip_bad_images,
        max_image_pixels,
        rebuild_store,
        store_format,
        jpeg_quality,
    )
    check_spec(arch) if arch else None
    recipe = resolve(
        preset,
        cfg,
        None,
        dict(
            teacher_arch=arch,
            dataset=dataset,
            subset=subset,
            **_training(locals()),
            bn_bias_lr=bn_bias_lr,
            augment=augment,
            mix=mix,
            mix_prob=mix_prob,
            seed=seed,
            tta_eval=tta_eval,
        ),
        teacher_stage=True,
        config_path=config,
    )
    _file_arch(recipe.for_teacher().teacher_arch if config else None, arch, config)
    if print_config:
        _print_config(recipe, "teacher")
    rt = _runtime(device, precision, compile, resident_mb, distributed=True)
    tblog.check(tensorboard, main=rt.main)
    with tblog.epoch_scalars(tensorboard, print_epoch) as on_epoch, RichProgress() as progress:
        result = train_teacher(
            recipe,
            data_dir=data_dir,
            out=out,
            rt=rt,
            force=force,
            resume=resume,
            progress=progress,
            on_epoch=on_epoch,
            data_options=data_options,
        )
    if rt.main:
        stage_summary("teacher", result)


@command("import-teacher")
def import_teacher_cmd(
    weights: Path = typer.Argument(
        ...,
        help=(
            "Weights trained elsewhere: a state dict (.pt/.pth, also nested under 'state_dict' or 'model'), "
            "loaded safely with no flag; a whole saved model needs --trust-pickle."
        ),
    ),
    arch: str = typer.Option(
        ...,
        "--arch",
        help="What the weights were trained as: a kdcache name, torchvision:NAME, timm:NAME or module.path:factory.",
    ),
    dataset: str | None = DatasetOpt,
    data_dir: Path | None = DataDirOpt,
    image_size: int | None = ImageSizeOpt,
    store_size: int | None = StoreSizeOpt,
    val_fraction: float | None = ValFractionOpt,
    skip_bad_images: bool = SkipBadOpt,
    max_image_pixels: int | None = MaxPixelsOpt,
    rebuild_store: bool = RebuildStoreOpt,
    store_format: str | None = StoreFormatOpt,
    jpeg_quality: int | None = JpegQualityOpt,
    mean: str | None = typer.Option(
        None,
        "--mean",
        help=(
            "Normalisation the weights were trained with, as R,G,B in [0, 1]. "
            "\\[default: ImageNet's for image folders, CIFAR's for CIFAR]"
        ),
    ),
    std: str | None = typer.Option(None, "--std", help="Its standard deviations, R,G,B. \\[default: with --mean's]"),
    small_stem: bool | None = typer.Option(
        None,
        "--small-stem/--no-small-stem",
        help=(
            "ResNet-style models: the CIFAR stem (3x3 stride 1, no max-pool) or the ImageNet one. "
            "\\[default: the CIFAR stem for images of at most 64 pixels]"
        ),
    ),
    batch_size: int = typer.Option(512, "--batch-size", help="Evaluation batch size."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    out: Path = typer.Option(Path("saved_models/imported_teacher.pt"), "--out", help="kdcache checkpoint to write."),
    force: bool = ForceOpt,
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help=(
            "Also load a whole pickled model (torch.save(model)): this runs code from the file, "
            "so only for files you trust. A state dict needs no flag."
        ),
    ),
):
    """Wrap a teacher trained elsewhere into a kdcache checkpoint, checked against the data's classes.

    The weights are evaluated on the validation split; the checkpoint records that accuracy, the
    normalisation, the input size and the data fingerprint, so dump-logits can use it as --teacher.
    A state dict is loaded safely (weights_only=True) and needs no flag; a whole pickled model
    runs code from the file when loaded, so it needs --trust-pickle.
    """
    from kdcache.imports import import_teacher

    dataset, data_options = _data_options(
        dataset or None,
        data_dir,
        image_size,
        store_size,
        val_fraction,
        skip_bad_images,
        max_image_pixels,
        rebuild_store,
        store_format,
        jpeg_quality,
    )

    def rgb(flag: str, text: str | None):
        values = _numbers(flag, text)
        if values is not None and (len(values) != 3 or not all(math.isfinite(v) for v in values)):
            raise KDCacheError(f"{flag} takes three numbers R,G,B (got {text!r}), e.g. {flag} 0.485,0.456,0.406")
        return values

    m, s = rgb("--mean", mean), rgb("--std", std)
    if (m is None) != (s is None):
        raise KDCacheError("--mean and --std go together: pass both, or neither for the defaults")
    if s is not None and min(s) <= 0:
        raise KDCacheError(f"--std must be positive (got {std})")
    rt = _runtime(device, precision, False)
    with RichProgress() as progress:
        meta = import_teacher(
            weights,
            arch=arch,
            dataset=dataset or "cifar10",
            data_dir=data_dir,
            data_options=data_options,
            out=out,
            rt=rt,
            mean=m,
            std=s,
            small_stem=small_stem,
            batch_size=batch_size,
            force=force,
            progress=progress,
            trust_pickle=trust_pickle,
        )
    print_imported(meta, arch, out)


@command("dump-logits")
def dump_cmd(
    preset: str | None = PresetOpt,
    teacher: list[Path] = typer.Option(
        [TEACHER_OUT],
        "--teacher",
        help=(
            "Teacher checkpoint written by `kdcache teacher` or `import-teacher`. Repeat it for an ensemble: "
            "the cache then holds log(mean of the members' softmax), valid logits at T=1."
        ),
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=(
            "Refuse a teacher of any other architecture; naming a module.path:factory one here also lets it be "
            "built (as --trust-arch)."
        ),
    ),
    trust_arch: bool = TrustArchOpt,
    views: int | None = typer.Option(
        None, "--views", help="Augmented views per image, K. \\[default: the preset's, 8 for seed-resnet]"
    ),
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help=(
            "Crop+flip views; --no-augment caches the plain image. \\[default: the preset's; without --preset, "
            "what the teacher was trained with]"
        ),
    ),
    mix: str | None = typer.Option(
        None,
        "--mix",
        help=(
            "Mixed views: none | cutmix | mixup | both. The teacher runs on the mixed image itself, "
            "and the cache stores the partner and box/weight, so a student replays exactly that image. "
            "\\[default: what the teacher was trained with]"
        ),
    ),
    mix_prob: float | None = MixProbOpt,
    data_dir: Path | None = DataDirOpt,
    dataset: str | None = FixedDatasetOpt,
    image_size: int | None = FixedImageSizeOpt,
    rebuild_store: bool = RebuildStoreOpt,
    resident_mb: float | None = ResidentOpt,
    subset: int | None = typer.Option(
        None,
        "--subset",
        help="Use only the first N training images. \\[default: the images the teacher was trained on]",
    ),
    seed: int | None = SeedOpt,
    batch_size: int | None = typer.Option(None, "--batch-size", help="Teacher inference batch size. \\[default: 512]"),
    block_rows: int | None = typer.Option(
        None, "--block-rows", help="Images per written block (the resume and checksum unit). \\[default: 1024]"
    ),
    topk: int | None = typer.Option(
        None,
        "--topk",
        help=(
            "Keep only the k largest logits per view (fp16) and their classes, "
            "plus the log-sum-exp of all logits at --topk-temperatures, so the tail's mass stays exact: "
            "for many classes (C=1000, k=10: 31x smaller per view at the default temperatures). "
            "Students then use --loss kd at one of those "
            "temperatures. 0: every logit. \\[default: 0, dense logits]"
        ),
    ),
    tta: str | None = typer.Option(
        None,
        "--tta",
        help=(
            "Test-time augmentation of the cached logits: none (the teacher's answer to exactly the view) "
            "| flip (the mean of its answers to the view and its mirror: a two-member ensemble, "
            "usually a little more accurate; recorded in the cache) | flip-translate (also shifted by a pixel: "
            "6 passes). \\[default: none]"
        ),
    ),
    topk_temperatures: str | None = typer.Option(
        None,
        "--topk-temperatures",
        help="Temperatures a top-k cache serves, comma-separated. \\[default: 1,2,3,4,5,8 and the recipe's T]",
    ),
    config: Path | None = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    out: Path = typer.Option(
        CACHE_OUT, "--out", help="HDF5 cache to write (built as OUT.partial, renamed when complete)."
    ),
    force: bool = ForceOpt,
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted dump (OUT.partial) from its last complete block."
    ),
):
    """Cache the teacher's raw logits for K deterministic augmented views of every training image."""
    from kdcache.checkpoints import read_checkpoint
    from kdcache.dump import dump_logits

    cfg = read_config(config)
    meta = read_checkpoint(teacher[0])
    taught = meta.get("recipe")
    fixed_by(teacher[0], dataset=(dataset, meta.get("dataset")), image_size=(image_size, meta.get("image_size")))
    recipe = resolve(
        preset,
        cfg,
        taught,
        dict(views=views, augment=augment, mix=mix, mix_prob=mix_prob, seed=seed, subset=subset),
        config_path=config,
    )
    recipe = teacher_views(recipe, taught, **config_given(cfg, mix=mix, mix_prob=mix_prob))  # crop/flip: the preset's
    own = dump_settings(
        cfg,
        config,
        tta=tta,
        topk=topk,
        batch_size=batch_size,
        block_rows=block_rows,
        topk_temperatures=_numbers("--topk-temperatures", topk_temperatures),
    )
    if print_config:
        _print_config(recipe, "dump-logits", dump=own)
    rt = _runtime(device, precision, compile, resident_mb, distributed=True)
    with RichProgress() as progress:
        path = dump_logits(
            teacher_path=teacher if len(teacher) > 1 else teacher[0],
            data_dir=data_dir,
            out=out,
            views=recipe.views,
            seed=recipe.seed,
            rt=rt,
            subset=recipe.subset,
            augment=recipe.augment,
            mix=recipe.mix,
            mix_prob=recipe.mix_prob,
            arch=arch,
            trust_arch=trust_arch,
            force=force,
            resume=resume,
            progress=progress,
            rebuild_store=rebuild_store,
            **own.dump_args(),
        )
    if rt.main:
        print_cache_summary(path, recipe.T)


def _numbers(flag: str, text: str | None) -> tuple[float, ...] | None:
    """A comma-separated list of numbers, or a one-line error naming the flag."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise KDCacheError(f"{flag} takes numbers separated by commas (got {text!r}), e.g. {flag} 1,2,4") from None


@command("student")
def student_cmd(
    preset: str | None = PresetOpt,
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=(
            "Student architecture: resnet18|34|50, resnet9s, seed-cnn-student, torchvision:NAME, "
            "timm:NAME or module.path:factory. \\[default: resnet18]"
        ),
    ),
    cache: Path = CacheOpt,
    online_teacher: Path | None = typer.Option(
        None,
        "--online-teacher",
        help=(
            "No cache: run this teacher checkpoint on a fresh view every step (online distillation, "
            "to compare with the cache at equal budget). The views are of the family the teacher trained on "
            "(crop/flip or not, its --mix and --mix-prob), whatever --preset says; --augment/--no-augment, "
            "--mix and --mix-prob change them."
        ),
    ),
    trust_arch: bool = TrustArchOpt,
    loss: str | None = LossOpt,
    augment: bool | None = typer.Option(
        None,
        "--augment/--no-augment",
        help="With --online-teacher only: crop+flip views, or the plain image. \\[default: the teacher's]",
    ),
    mix: str | None = typer.Option(
        None, "--mix", help="With --online-teacher only: none | cutmix | mixup | both. \\[default: the teacher's]"
    ),
    mix_prob: float | None = typer.Option(
        None, "--mix-prob", help="With --online-teacher only. \\[default: the teacher's]"
    ),
    data_dir: Path | None = DataDirOpt,
    dataset: str | None = FixedDatasetOpt,
    image_size: int | None = FixedImageSizeOpt,
    views: int | None = typer.Option(
        None,
        "--views",
        help="Fixed by the cache (its K views per image): accepted when it is the same, refused otherwise.",
    ),
    rebuild_store: bool = RebuildStoreOpt,
    resident_mb: float | None = ResidentOpt,
    subset: int | None = CacheSubsetOpt,
    epochs: int | None = EpochsOpt,
    batch_size: int | None = BatchOpt,
    lr: float | None = LrOpt,
    optimizer: str | None = OptimOpt,
    schedule: str | None = ScheduleOpt,
    warmup_epochs: int | None = WarmupOpt,
    nesterov: bool | None = NesterovOpt,
    momentum: float | None = MomentumOpt,
    weight_decay: float | None = WeightDecayOpt,
    label_smoothing: float | None = LabelSmoothingOpt,
    ema: float | None = EmaOpt,
    T: float | None = typer.Option(None, "--T", help="Distillation temperature (> 0). \\[default: the preset's, 3]"),
    alpha: float | None = typer.Option(
        None,
        "--alpha",
        help=(
            "Weight of the soft-target loss in [0, 1]; 0 trains the student alone. \\[default: the preset's, "
            "0.5 for seed-resnet]"
        ),
    ),
    seed: int | None = SeedOpt,
    config: Path | None = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    out: Path = typer.Option(
        STUDENT_OUT, "--out", help="Checkpoint to write (metrics go beside it as OUT.metrics.jsonl)."
    ),
    tensorboard: Path | None = TensorBoardOpt,
    force: bool = ForceOpt,
    resume: bool = ResumeOpt,
):
    """Train a student against the cached soft targets, replaying exactly the views the teacher saw.

    Loss = alpha * soft(s, t) + (1 - alpha) * CE, where soft is --loss (kd: T^2 * KL(softmax(t/T) ||
    softmax(s/T))) and, on a mixed view, CE = lam * CE(s, y_i) + (1 - lam) * CE(s, y_j). Each epoch
    shows every image one of its K cached views, each once per K epochs.
    """
    from kdcache import tblog
    from kdcache.stages import student_recipe, train_student

    recipe = student_recipe(
        cache,
        preset,
        read_config(config),
        dict(
            student_arch=arch,
            **_training(locals()),
            T=T,
            alpha=alpha,
            seed=seed,
            loss=loss,
            augment=augment,
            mix=mix,
            mix_prob=mix_prob,
            subset=subset,
            dataset=dataset,
            image_size=image_size,
            views=views,
        ),
        online_teacher=online_teacher,
        trust_arch=trust_arch,
        config_path=config,
    )
    if print_config:
        _print_config(recipe, "student")
    rt = _runtime(device, precision, compile, resident_mb, distributed=True)
    tblog.check(tensorboard, main=rt.main)
    with tblog.epoch_scalars(tensorboard, print_epoch) as on_epoch, RichProgress() as progress:
        result = train_student(
            recipe,
            cache_file=cache,
            data_dir=data_dir,
            out=out,
            rt=rt,
            force=force,
            online_teacher=online_teacher,
            resume=resume,
            progress=progress,
            on_epoch=on_epoch,
            rebuild_store=rebuild_store,
            trust_arch=trust_arch,
        )
    if rt.main:
        stage_summary("student", result)
        warn_weak_teacher(result.teacher_test_acc, result.test_acc, "this student")


@command("sweep")
def sweep_cmd(
    T: str | None = typer.Option(
        None, "--T", help="Temperatures, a comma list (each > 0), e.g. 1,2,4. \\[default: 1,2,4]"
    ),
    alpha: str | None = typer.Option(
        None,
        "--alpha",
        help=(
            "Weights of the soft-target loss, a comma list in [0, 1], e.g. 0.5,0.9. The student alone (alpha 0) "
            "is always trained beside them. \\[default: 0.5,0.9]"
        ),
    ),
    loss: str | None = typer.Option(
        None, "--loss", help="Soft-target losses, a comma list of kd, dkd, dist, ls. \\[default: kd]"
    ),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help=(
            "A count (3: seeds 0, 1, 2), a list (0,1,2; one seed: 5,) or a range (3-5). A seed fixes a student's "
            "initial weights and batch order: students of one seed see the very same batches. \\[default: 3]"
        ),
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help="Student architectures, a comma list (see `kdcache student --help`). \\[default: the recipe's student]",
    ),
    val_fraction: float | None = typer.Option(
        None,
        "--val-fraction",
        help=(
            "Hold out this share of the cache's images (a fixed, recorded draw; no student trains on them) and "
            "pick the winner on them. 0: pick on the test set, reported as optimistic. \\[default: 0.1]"
        ),
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help=(
            "loop: students one after another on each batch (any architectures; on a CPU each equals `kdcache "
            "student` bit for bit) | stacked: the students of one architecture fused with torch.func (vmap; "
            "faster on a GPU) | auto: a short timed probe picks. \\[default: auto]"
        ),
    ),
    keep: str | None = typer.Option(
        None,
        "--keep",
        help="best: keep the winner as OUT/best.pt | all: also every student in OUT/students/. \\[default: best]",
    ),
    preset: str | None = PresetOpt,
    cache: Path = CacheOpt,
    trust_arch: bool = TrustArchOpt,
    data_dir: Path | None = DataDirOpt,
    rebuild_store: bool = RebuildStoreOpt,
    resident_mb: float | None = ResidentOpt,
    subset: int | None = CacheSubsetOpt,
    epochs: int | None = EpochsOpt,
    batch_size: int | None = BatchOpt,
    lr: float | None = LrOpt,
    optimizer: str | None = OptimOpt,
    schedule: str | None = ScheduleOpt,
    warmup_epochs: int | None = WarmupOpt,
    nesterov: bool | None = NesterovOpt,
    momentum: float | None = MomentumOpt,
    weight_decay: float | None = WeightDecayOpt,
    label_smoothing: float | None = LabelSmoothingOpt,
    ema: float | None = EmaOpt,
    config: Path | None = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    out: Path = typer.Option(
        SWEEP_OUT, "--out", help="Folder for sweep.json, report.md, sweep.png and best.pt (locked while it runs)."
    ),
    force: bool = ForceOpt,
    resume: bool = ResumeOpt,
):
    """Train a grid of students from one cache in one pass, always with the student alone beside them.

    Every (architecture, seed) trains the student alone (alpha 0), every --T x --alpha x --loss setting and
    the design card's (T=3, alpha 0.5, kd) on the same batches: the data, the cache and the test set are
    loaded once, each batch is rendered once. The table gives val and test accuracy over seeds, the paired
    gain over alone with its 95% interval ("within noise" where it covers 0), agreement and KL with the
    teacher; the winner is picked on the held-out images (--val-fraction) and saved as OUT/best.pt.
    Example: kdcache sweep --T 1,2,4 --alpha 0.5,0.9 --seeds 3 --epochs 30.
    """
    import sys

    from kdcache.config import SWEEP_LISTS
    from kdcache.present import print_sweep
    from kdcache.stages import student_recipe
    from kdcache.sweeps import SweepSpec, parse_list, parse_seeds, run_sweep

    cfg = read_config(config)
    table = cfg.pop("sweep", {})
    typed = {
        "T": T,
        "alpha": alpha,
        "loss": loss,
        "seeds": seeds,
        "arch": arch,
        "val_fraction": val_fraction,
        "backend": backend,
        "keep": keep,
    }
    axes = {k: v for k, v in table.items()} | {k: v for k, v in typed.items() if v is not None}
    given = {}
    for key in ("T", "alpha"):
        if key in axes:
            given[key] = parse_list(f"--{key}", axes[key])
    for key in ("loss", "arch"):
        if key in axes:
            given[key] = parse_list(f"--{key}", axes[key], str)
    if "seeds" in axes:
        given["seeds"] = parse_seeds(axes["seeds"])
    given |= {k: axes[k] for k in ("val_fraction", "backend", "keep") if k in axes}
    spec = SweepSpec(**given)
    if "arch" in table and arch is None and not trust_arch:  # code a file names runs only when the user names it
        from kdcache.models import refuse_code

        for spec_arch in spec.arch:
            refuse_code(
                spec_arch,
                f"the config file {config}",
                f"pass --arch {spec_arch} (or --trust-arch) if you trust that code",
            )
    first_arch = spec.arch[0] if spec.arch else None
    recipe = student_recipe(
        cache,
        preset,
        cfg,
        dict(
            student_arch=first_arch,
            **_training(locals()),
            subset=subset,
        ),
        trust_arch=trust_arch or bool(arch),
        config_path=config,
    )
    if print_config:
        from kdcache.config import to_toml

        sweep = {
            k: list(getattr(spec, k)) or [recipe.student_arch] if k in SWEEP_LISTS else getattr(spec, k)
            for k in ("T", "alpha", "loss", "seeds", "arch", "val_fraction", "backend", "keep")
        }
        typer.echo(
            to_toml(recipe, header="kdcache sweep: the resolved recipe (use it with --config FILE)", sweep=sweep),
            nl=False,
        )
        raise typer.Exit(0)
    rt = _runtime(device, precision, compile, resident_mb)
    with RichProgress() as progress:
        result = run_sweep(
            recipe,
            spec,
            cache_file=cache,
            data_dir=data_dir,
            out=out,
            rt=rt,
            force=force,
            resume=resume,
            progress=progress,
            rebuild_store=rebuild_store,
            command="kdcache " + " ".join(sys.argv[1:]),
        )
    print_sweep(result.record, out)


@command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `kdcache teacher` or `kdcache student`."),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=(
            "Refuse a checkpoint of any other architecture; naming a module.path:factory one here also lets it be "
            "built (as --trust-arch)."
        ),
    ),
    trust_arch: bool = TrustArchOpt,
    data_dir: Path | None = DataDirOpt,
    batch_size: int = typer.Option(1024, "--batch-size", help="Inference batch size."),
    tta: str = typer.Option(
        "none",
        "--tta",
        help=(
            "Test-time augmentation: none | flip (mean of the image's and its mirror's logits) "
            "| flip-translate (also shifted one pixel each way, as airbench evaluates)."
        ),
    ),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
):
    """Print a checkpoint's test accuracy on its dataset."""
    from kdcache.checkpoints import check_classes, load_checkpoint
    from kdcache.data import load_dataset, recorded_options
    from kdcache.inference import TTAModel, accuracy, predict
    from kdcache.models import num_params

    if batch_size < 1:
        raise KDCacheError(f"--batch-size must be >= 1 (got {batch_size})")
    if tta not in TTAModel.LEVELS:
        raise KDCacheError(f"--tta must be one of {', '.join(TTAModel.LEVELS)} (got {tta!r})")
    rt = _runtime(device, precision, False)
    model, meta = load_checkpoint(checkpoint, arch=arch, device=rt.device, trust_arch=trust_arch)
    data = load_dataset(meta["dataset"], data_dir, subset=1, **recorded_options(meta))
    check_classes(checkpoint, meta, data.name, data.num_classes)
    logits = predict(
        TTAModel(rt.prepare(model), tta),
        data.test_x,
        meta["normalize_mean"],
        meta["normalize_std"],
        rt,
        batch_size=batch_size,
    )
    print_eval(checkpoint, meta["arch"], num_params(model), data, tta, accuracy(logits, data.test_y))


@command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="A checkpoint written by `kdcache teacher`, `student` or `import-teacher`."
    ),
    format: str = typer.Option(
        ...,
        "--format",
        help=(
            "onnx (onnxruntime and other ONNX runtimes; pip install 'kdcache[export]') | safetensors (the weights) "
            "| torch-export (a torch.export program, .pt2, with its facts in FILE.json)."
        ),
    ),
    out: Path = typer.Option(..., "--out", help="The file to write (onnx: .onnx, torch-export: .pt2)."),
    input: str = typer.Option(
        "float",
        "--input",
        help="What the onnx/torch-export model takes: float (RGB in [0, 1]) | uint8 (RGB 0-255). NCHW either way.",
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        "--data",
        help="Where the checkpoint's dataset is, for the check on its test images. \\[default: as it recorded]",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite --out (and a torch-export's FILE.json)."),
    trust_arch: bool = TrustArchOpt,
):
    """Export a checkpoint to ONNX, safetensors or torch.export, checked against the checkpoint's own logits."""
    from kdcache.export import export

    done = export(checkpoint, out, format=format, input=input, data_dir=data_dir, force=force, trust_arch=trust_arch)
    c = done.check
    out_console.print(
        f"exported {checkpoint} as {done.format} to {done.path} ({done.bytes / 1e6:.2f} MB, {done.seconds:.1f} s)"
        + (f", facts in {done.side}" if done.side else ""),
        highlight=False,
    )
    out_console.print(
        f"checked with {c.runtime} on {c.images}: max |logit diff| {c.max_diff:.2g} (<= {c.tolerance:.2g}), "
        f"top-1 identical {c.agree}/{c.total}",
        highlight=False,
    )


@command("predict")
def predict_cmd(
    model: Path = typer.Argument(
        ..., help="A kdcache checkpoint, or a .onnx / .safetensors file from `kdcache export`."
    ),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them (searched recursively)."),
    topk: int = typer.Option(5, "--topk", help="How many classes to show per image."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (one list of images) instead of a table."),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Skip images that do not decode (one line each) instead of stopping."
    ),
    trust_arch: bool = TrustArchOpt,
):
    """Top-k classes for image files, resized as kdcache evaluates an image folder at the model's image size."""
    import json

    from rich.table import Table

    from kdcache.classify import classify

    def warn(line: str) -> None:
        typer.echo(f"warning: {line}", err=True)

    clf, rows = classify(model, images, topk=topk, skip_bad=skip_bad_images, trust_arch=trust_arch, warn=warn)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table(title=f"{clf.path} ({clf.arch}, {clf.kind}, {clf.image_size} px)")
    table.add_column("image", overflow="fold")
    for rank in range(len(rows[0]["top"])):
        table.add_column(f"#{rank + 1}")
    for row in rows:
        table.add_row(row["image"], *(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"]))
    out_console.print(table)


@command("inspect")
def inspect_cmd(
    cache: Path = typer.Argument(..., help="A logit cache (complete or interrupted); with --config also a checkpoint."),
    T: float = typer.Option(3.0, "--T", help="Temperature for the soft-target entropy."),
    config: bool = typer.Option(
        False,
        "--config",
        help=(
            "Print the recipe the cache or checkpoint recorded, as a TOML config file: "
            "`kdcache inspect student.pt --config > run.toml`, then `kdcache student --config run.toml ...` repeats "
            "the run."
        ),
    ),
):
    """Summarise a cache: format, dataset, N x K x C, size, teacher, accuracy, entropy, completeness."""
    if config:
        from kdcache.config import to_toml
        from kdcache.stages import recorded_recipe

        recipe, note, dump = recorded_recipe(cache)
        typer.echo(to_toml(Recipe.from_dict(recipe), header=note, dump=dump), nl=False)
        return
    if not (math.isfinite(T) and T > 0):
        raise KDCacheError(f"--T must be a finite number > 0 (got {T})")
    print_cache_summary(cache, T)


@command("verify")
def verify_cmd(
    cache: Path = typer.Argument(..., help="The logit cache to check."),
    teacher: list[Path] = typer.Option(
        [TEACHER_OUT],
        "--teacher",
        help="The teacher checkpoint the cache was made with (each member, in order, for an ensemble).",
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=(
            "Refuse a teacher of any other architecture; naming a module.path:factory one here also lets it be "
            "built (as --trust-arch)."
        ),
    ),
    trust_arch: bool = TrustArchOpt,
    data_dir: Path | None = DataDirOpt,
    samples: int = typer.Option(
        256, "--samples", help="Random (image, view) pairs to re-render and re-run through the teacher."
    ),
    device: str = DeviceOpt,
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 | auto for the teacher re-run."),
):
    """Prove a cache: metadata, shapes, finite values, view params, block checksums, fingerprint, teacher replay.

    Exit 0 when everything holds, 1 when something is wrong (the table says what).
    """
    from kdcache.verify import verify_cache

    report = verify_cache(
        cache,
        teacher=teacher,
        data_dir=data_dir,
        samples=samples,
        rt=_runtime(device, precision, False),
        arch=arch,
        trust_arch=trust_arch,
    )
    print_verify(cache, report)
    if not report.ok:
        failed = ", ".join(c.name for c in report.checks if not c.ok)
        typer.echo(f"verify failed: {failed}", err=True)
        raise typer.Exit(1)


@command("bench")
def bench_cmd(
    teacher_arch: str = typer.Option("resnet50", "--teacher-arch", help="Teacher architecture (random weights)."),
    student_arch: str = typer.Option("resnet18", "--student-arch", help="Student architecture (random weights)."),
    batch_size: int = typer.Option(512, "--batch-size", help="Batch size for every loop."),
    steps: int = typer.Option(50, "--steps", help="Timed steps per loop."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed steps per loop before the first round."),
    repeats: int = typer.Option(
        3,
        "--repeats",
        help="Rounds: the loops take turns, each timed once a round; the table shows each loop's median.",
    ),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        "--data",
        help=(
            "Real CIFAR-10 here, or an image folder (with train/): its store-backed loops; without it, "
            "synthetic uint8 images of CIFAR's shape."
        ),
    ),
    image_folder: bool = typer.Option(
        False,
        "--image-folder",
        help=(
            "Measure the image-folder loops (resident and streamed store, random-resized crops) "
            "on a synthetic folder when --data is not one."
        ),
    ),
    image_size: int = typer.Option(64, "--image-size", help="Image-folder loops: view size in pixels."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    procs: int | None = typer.Option(
        None,
        "--procs",
        help=(
            "Instead: the cached student and the dump in N processes under torchrun (DDP; CPU cores split evenly, "
            "or one GPU each) against 1 process, taking turns."
        ),
    ),
    sweep_students: int = typer.Option(
        8,
        "--sweep-students",
        help=(
            "The sweep loops: this many students of --student-arch from the cache in one pass (kdcache sweep's "
            "loop and stacked backends) against as many separate runs; 0 leaves them out."
        ),
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the figures as JSON here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
):
    """Measure img/s of the reference recipe's loop, online KD, cached KD (plain and mixed views), no-teacher
    training (plain and mixed views), the dump, and M students in one pass (kdcache sweep) against M runs.

    All run side by side in one process on one device, taking turns for
    --repeats rounds of --steps steps; the table shows each loop's median, its
    spread over the rounds, and the ratios that matter. --procs N measures
    torchrun instead.
    """
    from kdcache.bench import BenchConfig, run_bench

    with claim_output(json_path, force=force, flag="--json") if json_path else contextlib.nullcontext():
        rt = _runtime(device, precision, compile)
        if procs is not None:
            return _procs_bench(
                BenchConfig(teacher_arch, student_arch, batch_size, steps, warmup, repeats), procs, rt, json_path
            )
        if image_folder or (data_dir is not None and (data_dir / "train").is_dir()):
            folder = data_dir if data_dir is not None and (data_dir / "train").is_dir() else None
            record = _folder_bench(
                teacher_arch, student_arch, batch_size, steps, warmup, repeats, folder, image_size, rt
            )
            return _write_bench_json(json_path, record)
        cfg = BenchConfig(
            teacher_arch, student_arch, batch_size, steps, warmup, repeats, data_dir, sweep_students=sweep_students
        ).validate()
        err_console.print(
            f"bench {teacher_arch} -> {student_arch} · batch {batch_size} · "
            f"{repeats} rounds of {steps} steps · {rt.describe()}",
            highlight=False,
        )
        with err_console.status("measuring") as status:
            record = run_bench(cfg, rt, log=lambda msg: status.update(msg))
        print_bench(record)
        _write_bench_json(json_path, record)


def _write_bench_json(json_path: Path | None, record: dict) -> None:
    import json

    if json_path:
        atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")


def _procs_bench(cfg, procs: int, rt, json_path: Path | None) -> None:
    from kdcache.bench import run_procs_bench

    err_console.print(
        f"bench torchrun {cfg.teacher_arch} -> {cfg.student_arch} · batch {cfg.batch_size} · 1 vs {procs} processes · "
        f"{cfg.repeats} rounds of {cfg.steps} steps",
        highlight=False,
    )
    with err_console.status("measuring") as status:
        record = run_procs_bench(cfg, procs, rt, log=lambda msg: status.update(msg))
    print_procs_bench(record, cfg, procs)
    _write_bench_json(json_path, record)


def _folder_bench(teacher_arch, student_arch, batch_size, steps, warmup, repeats, folder, image_size, rt) -> dict:
    from kdcache.bench import BenchConfig, run_folder_bench

    cfg = BenchConfig(teacher_arch, student_arch, batch_size, steps, warmup, repeats).validate()
    err_console.print(
        f"bench image folder {folder or '(synthetic)'} · {teacher_arch} -> {student_arch} · "
        f"{image_size} px · batch {batch_size} · {repeats} rounds of {steps} steps · {rt.describe()}",
        highlight=False,
    )
    with err_console.status("measuring") as status:
        record = run_folder_bench(cfg, rt, folder, image_size, log=lambda msg: status.update(msg))
    print_folder_bench(record)
    return record


@command("pipeline")
def pipeline_cmd(
    preset: str | None = PresetOpt,
    out: Path = typer.Option(Path("runs/run"), "--out", help="Run directory for every artifact and the report."),
    data_dir: Path | None = DataDirOpt,
    image_size: int | None = ImageSizeOpt,
    store_size: int | None = StoreSizeOpt,
    val_fraction: float | None = ValFractionOpt,
    skip_bad_images: bool = SkipBadOpt,
    max_image_pixels: int | None = MaxPixelsOpt,
    rebuild_store: bool = RebuildStoreOpt,
    store_format: str | None = StoreFormatOpt,
    jpeg_quality: int | None = JpegQualityOpt,
    resident_mb: float | None = ResidentOpt,
    subset: int | None = SubsetOpt,
    teacher_arch: str | None = typer.Option(None, "--teacher-arch", help="[default: the preset's]"),
    student_arch: str | None = typer.Option(None, "--student-arch", help="[default: the preset's]"),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Student epochs (and teacher's unless --teacher-epochs). \\[default: the preset's]"
    ),
    teacher_epochs: int | None = typer.Option(
        None, "--teacher-epochs", help="Teacher epochs. \\[default: the preset's]"
    ),
    batch_size: int | None = BatchOpt,
    lr: float | None = LrOpt,
    optimizer: str | None = OptimOpt,
    schedule: str | None = ScheduleOpt,
    warmup_epochs: int | None = WarmupOpt,
    nesterov: bool | None = NesterovOpt,
    views: int | None = typer.Option(None, "--views", help="Cached views per image, K. \\[default: the preset's]"),
    augment: bool | None = typer.Option(
        None, "--augment/--no-augment", help="Crop+flip views for teacher and cache. \\[default: the preset's]"
    ),
    teacher_augment: bool | None = typer.Option(
        None,
        "--teacher-augment/--no-teacher-augment",
        help=(
            "The teacher's own training views, when they differ from the cache's (a teacher trained on crops + "
            "flips labels plain views well). \\[default: the preset's, else as --augment]"
        ),
    ),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Reuse this teacher checkpoint instead of training one."
    ),
    teachers: int = typer.Option(
        1,
        "--teachers",
        help=(
            "Train N teachers (seeds --seed, --seed + 1, ...) and cache their ensemble (the log of their mean "
            "softmax); the report lists each member and the ensemble."
        ),
    ),
    trust_arch: bool = typer.Option(
        False,
        "--trust-arch",
        help=(
            "The --teacher checkpoint may name a module.path:factory architecture: "
            "building it imports the module and runs its code, so only for files you trust."
        ),
    ),
    mix: str | None = MixOpt,
    mix_prob: float | None = MixProbOpt,
    loss: str | None = LossOpt,
    with_online: bool = typer.Option(
        False,
        "--with-online",
        help=(
            "Also train the KD student with the teacher in the loop on fresh views of the same family (no cache): "
            "accuracy and time beside the cached student."
        ),
    ),
    T: float | None = typer.Option(None, "--T", help="Distillation temperature. \\[default: the preset's]"),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Soft-target weight of the KD student. \\[default: the preset's]"
    ),
    seed: int | None = SeedOpt,
    tta_eval: str | None = TtaEvalOpt,
    config: Path | None = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    compile: bool = CompileOpt,
    tensorboard: Path | None = typer.Option(
        None,
        "--tensorboard",
        help=(
            "Also write each training stage's per-epoch metrics (as its OUT.metrics.jsonl: loss, accuracies, lr, "
            "img/s, the students' agreement and KL with the teacher, the teacher's TTA accuracies) "
            "as TensorBoard scalars, the epoch as the step, one subfolder of DIR per report row (teacher, "
            "student_alone, student_with_kd, student_online_kd); view them side by side with `tensorboard --logdir "
            "DIR`. Needs pip install 'kdcache\\[tensorboard]'."
        ),
        metavar="DIR",
    ),
    force: bool = typer.Option(False, "--force", help="Redo every stage, overwriting the run directory's artifacts."),
    resume: bool = typer.Option(False, "--resume", help="Keep finished stages, continue an interrupted one."),
):
    """Run teacher -> dump-logits -> student with KD -> the same student alone, then compare them.

    Writes OUT/report.json, OUT/report.md and OUT/accuracy.png beside the four artifacts: the plot
    has each row's test accuracy against the epoch and against cumulative training time.
    """
    from kdcache.models import check_spec
    from kdcache.pipeline import dump_batch_size, run_pipeline

    for spec in (teacher_arch, student_arch):
        check_spec(spec) if spec else None
    cfg = read_config(config)
    dataset, data_options = _data_options(
        cfg.get("dataset"),
        data_dir,
        image_size,
        store_size,
        val_fraction,
        skip_bad_images,
        max_image_pixels,
        rebuild_store,
        store_format,
        jpeg_quality,
    )
    name = preset or cfg.get("preset") or (f"config {config}" if config else DEFAULT_PRESET)
    recipe = resolve(
        preset,
        cfg,
        None,
        dict(
            dataset=dataset,
            subset=subset,
            teacher_arch=teacher_arch,
            student_arch=student_arch,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            nesterov=nesterov,
            views=views,
            augment=augment,
            T=T,
            alpha=alpha,
            seed=seed,
            mix=mix,
            mix_prob=mix_prob,
            loss=loss,
        ),
        config_path=config,
    ).override_teacher(epochs=teacher_epochs, augment=teacher_augment, tta_eval=tta_eval)  # the teacher table's
    if config:
        _file_arch(recipe.for_teacher().teacher_arch, teacher_arch, config, "--teacher-arch")
        _file_arch(recipe.student_arch, student_arch, config, "--student-arch")
    # the file's [dump] table: the dump stage's own settings (its batch size by default as without a table)
    dump = (
        dump_settings({"dump": {"batch_size": dump_batch_size(recipe), **cfg["dump"]}}, config)
        if "dump" in cfg
        else None
    )
    if print_config:
        _print_config(recipe, "pipeline", dump=dump)
    rt = _runtime(device, precision, compile, resident_mb)
    with RichProgress() as progress:
        record = run_pipeline(
            recipe,
            preset=name,
            run_dir=out,
            data_dir=data_dir,
            rt=rt,
            teacher=teacher,
            dump=dump,
            trust_arch=trust_arch,
            teachers=teachers,
            with_online=with_online,
            data_options=data_options,
            force=force,
            resume=resume,
            progress=progress,
            on_epoch=print_epoch,
            tensorboard=tensorboard,
            log=lambda msg: err_console.print(f"[bold]{msg}[/]", highlight=False),
        )
    print_pipeline(record, out)


@command("report")
def report_cmd(
    run_dirs: list[Path] = typer.Argument(
        ..., help="One or more run directories written by `kdcache pipeline`, or one folder written by `kdcache sweep`."
    ),
    plot_path: Path | None = typer.Option(
        None, "--plot", help="Combined plot for several runs. \\[default: comparison.png beside the first run]"
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help=(
            "Overwrite an existing plot file (--plot, or comparison.png for several runs); "
            "each run's own report files are always re-rendered."
        ),
    ),
):
    """Re-render the comparison table, report files and plot from saved metrics; several runs side by side."""
    from kdcache.present import print_sweep
    from kdcache.report import load_sweep, plot, write_report, write_sweep_report

    sweeps = [(d, load_sweep(d)) for d in run_dirs]
    if any(record for _, record in sweeps):
        if len(run_dirs) > 1 or plot_path:
            raise KDCacheError("a sweep folder is reported alone: kdcache report SWEEP_DIR (its plot is sweep.png)")
        write_sweep_report(run_dirs[0], sweeps[0][1])
        print_sweep(sweeps[0][1], run_dirs[0])
        return
    target = plot_path or (run_dirs[0].parent / "comparison.png" if len(run_dirs) > 1 else None)
    with claim_output(target, force=force, flag="--plot") if target else contextlib.nullcontext():
        records = [write_report(d) for d in run_dirs]
        out_console.print(report_table(records))
        for record in records:
            print_warnings(record)
        if target:
            plot(records, target)
    if len(records) > 1:
        out_console.print(f"plot: {target}", highlight=False)
    else:
        out_console.print(
            f"report: {run_dirs[0] / 'report.md'} · plot: {target or run_dirs[0] / 'accuracy.png'}", highlight=False
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
