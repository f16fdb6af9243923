"""kdcache export and kdcache predict: every format runs without kdcache and gives the checkpoint's logits on
real test images; the facts travel in the file; damaged files and unexportable models are one line; predict
prepares images as an image folder is evaluated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, THREAD_ENV, assert_one_line_error, cli, run_cli, written
from PIL import Image

from kdcache.checkpoints import load_checkpoint, save_checkpoint
from kdcache.data import load_dataset
from kdcache.inference import predict
from kdcache.models import build
from kdcache.views import normalize

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ARCHS = ("seed-cnn-student", "resnet18", "torchvision:mobilenet_v3_small")
IMAGES = 16

# Loads the three files with onnxruntime, torch.export and safetensors + the library's own model (never
# kdcache), runs them on the test images and prints logits and metadata as JSON.
LOADER = r"""
import json, sys
import numpy as np
import torch
from torch import nn

arch, onnx_path, pt2_path, st_path, images_path = sys.argv[1:]
x = np.load(images_path).astype(np.float32) / 255.0  # uint8 RGB NCHW -> float in [0, 1]
out = {}

import onnxruntime as ort
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
out["onnx"] = session.run(None, {"images": x})[0].tolist()
out["onnx_one"] = session.run(None, {"images": x[:1]})[0].tolist()
out["onnx_meta"] = dict(session.get_modelmeta().custom_metadata_map)

program = torch.export.load(pt2_path)
with torch.no_grad():
    out["torch-export"] = program.module()(torch.from_numpy(x)).tolist()
out["pt2_meta"] = json.load(open(pt2_path + ".json"))

from safetensors import safe_open
from safetensors.torch import load_file
with safe_open(st_path, "pt") as f:
    meta = f.metadata()
num_classes = int(meta["num_classes"])
if arch.startswith("torchvision:"):
    import torchvision
    model = torchvision.models.get_model(arch.split(":")[1], weights=None, num_classes=num_classes)
elif arch == "resnet18":  # torchvision's, with the CIFAR stem (the metadata says small_stem: true)
    import torchvision
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
else:  # the seed student, written out
    model = nn.Sequential()
    model.features = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
    )
    model.classifier = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Dropout(), nn.Linear(256, num_classes))
model.load_state_dict(load_file(st_path))  # strict: every key, every shape
mean = torch.tensor(json.loads(meta["normalize_mean"])).view(1, 3, 1, 1)
std = torch.tensor(json.loads(meta["normalize_std"])).view(1, 3, 1, 1)
with torch.no_grad():
    out["safetensors"] = model.eval()((torch.from_numpy(x) - mean) / std).tolist()
out["safetensors_meta"] = meta
out["kdcache_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "kdcache")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cifar(data_dir):
    return load_dataset("cifar10", data_dir, download=False)


def make_checkpoint(path: Path, arch: str, data, role: str = "student") -> Path:
    """A checkpoint as the stages write one, for an untrained `arch` whose BatchNorm statistics are taken
    from 64 training images (trained for 0 epochs, but with logits that mean something)."""
    torch.manual_seed(0)
    size = data.geometry.size[0]
    model = build(arch, data.num_classes, image_size=size)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.momentum = None  # a plain average over the calibration batch
        with torch.no_grad():
            model.train()(normalize(torch.as_tensor(np.asarray(data.test_x[:64])), CIFAR_MEAN, CIFAR_STD))
    save_checkpoint(
        path,
        model.eval(),
        arch=arch,
        meta={
            "role": role,
            "num_classes": data.num_classes,
            "dataset": data.name,
            "dataset_fingerprint": data.fingerprint,
            "normalize_mean": list(CIFAR_MEAN),
            "normalize_std": list(CIFAR_STD),
            "classes": data.classes,
            "image_size": size,
            "data_options": data.options,
        },
    )
    return path


def reference(ckpt: Path, images: torch.Tensor, cpu) -> torch.Tensor:
    """The checkpoint's own logits, as `kdcache eval` computes them."""
    model, meta = load_checkpoint(ckpt, trust_arch=True)
    return predict(model, images, meta["normalize_mean"], meta["normalize_std"], cpu)


@pytest.fixture(scope="module")
def export_all(tmp_path_factory, cifar, data_dir):
    """arch -> one architecture exported in all three formats through the CLI, then loaded by a process
    without kdcache: (arch, checkpoint, {format: path}, {format: stdout}, what the loader printed). Once each."""
    done = {}

    def export_all(arch: str):
        if arch not in done:
            done[arch] = _export_all(arch, tmp_path_factory.mktemp(arch.replace(":", "_")), cifar, data_dir)
        return done[arch]

    return export_all


def _export_all(arch: str, folder: Path, cifar, data_dir: Path):
    ckpt = make_checkpoint(folder / "model.pt", arch, cifar)
    files = {"onnx": folder / "m.onnx", "torch-export": folder / "m.pt2", "safetensors": folder / "m.safetensors"}
    printed = {}
    for fmt, path in files.items():
        code, err, out = cli("export", ckpt, "--format", fmt, "--out", path, "--data-dir", data_dir)
        assert code == 0, err
        printed[fmt] = out
    np.save(folder / "images.npy", cifar.test_x[:IMAGES].numpy())
    script = folder / "loader.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | THREAD_ENV
    loaded = subprocess.run(
        [sys.executable, str(script), arch, *map(str, files.values()), str(folder / "images.npy")],
        capture_output=True,
        text=True,
        cwd=folder,
        env=env,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr
    return arch, ckpt, files, printed, json.loads(loaded.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, export_all):
    return export_all(request.param)


@pytest.fixture(scope="module")
def seed_student(export_all):
    return export_all("seed-cnn-student")


def test_every_format_gives_the_checkpoints_logits_without_kdcache(exported, cifar, cpu):
    arch, ckpt, _, printed, loaded = exported
    assert loaded["kdcache_imported"] == []
    want = reference(ckpt, cifar.test_x[:IMAGES], cpu)
    assert want.std() > 1e-3  # logits that tell classes apart: top-1 agreement means something
    for fmt in ("onnx", "torch-export", "safetensors"):
        got = torch.tensor(loaded[fmt])
        assert (got - want).abs().max() <= 1e-4, (fmt, (got - want).abs().max())
        assert torch.equal(got.argmax(1), want.argmax(1)), fmt
        assert "top-1 identical 8/8" in printed[fmt] and "10 cifar10 test images" not in printed[fmt]
        assert "8 cifar10 test images" in printed[fmt] and " MB, " in printed[fmt]
    assert (torch.tensor(loaded["onnx_one"]) - want[:1]).abs().max() <= 1e-4  # the batch dimension is dynamic


def test_the_facts_travel_in_every_file(exported, cifar):
    arch, ckpt, _, _, loaded = exported
    _, meta = load_checkpoint(ckpt, trust_arch=True)
    pt2 = loaded["pt2_meta"]  # a JSON file: lists and numbers as such
    assert pt2["classes"] == cifar.classes and pt2["num_classes"] == 10 and pt2["small_stem"] is (arch == "resnet18")
    loaded["pt2_meta"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in pt2.items()}
    for key in ("onnx_meta", "pt2_meta", "safetensors_meta"):
        facts = loaded[key]
        assert all(isinstance(v, str) for v in facts.values()), key
        assert facts["arch"] == arch and facts["dataset"] == "cifar10"
        assert json.loads(facts["classes"]) == cifar.classes
        assert json.loads(facts["normalize_mean"]) == pytest.approx(CIFAR_MEAN)
        assert json.loads(facts["normalize_std"]) == pytest.approx(CIFAR_STD)
        assert facts["dataset_fingerprint"] == meta["dataset_fingerprint"] == cifar.fingerprint
        assert facts["image_size"] == "32" and facts["num_classes"] == "10"
    assert loaded["onnx_meta"]["input"].startswith("float32 RGB in [0, 1]")
    assert loaded["onnx_meta"]["normalization"] == "folded in"
    assert loaded["safetensors_meta"]["normalization"].startswith("not folded in")


def test_uint8_input_and_a_teacher(tmp_path, teacher_ckpt, data_dir, cifar, cpu):
    """--input uint8 takes 0-255 bytes; a teacher that `kdcache teacher` trained exports like a student."""
    out = tmp_path / "teacher.onnx"
    code, err, stdout = cli(
        "export", teacher_ckpt, "--format", "onnx", "--input", "uint8", "--out", out, "--data-dir", data_dir
    )
    assert code == 0, err
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    got = torch.from_numpy(session.run(None, {"images": cifar.test_x[:IMAGES].numpy()})[0])
    want = reference(teacher_ckpt, cifar.test_x[:IMAGES], cpu)
    assert (got - want).abs().max() <= 1e-4 and torch.equal(got.argmax(1), want.argmax(1))
    assert session.get_modelmeta().custom_metadata_map["role"] == "teacher"


def test_without_the_data_it_checks_on_random_images(tmp_path, teacher_ckpt):
    code, err, out = cli("export", teacher_ckpt, "--format", "torch-export", "--out", tmp_path / "t.pt2",
                         "--data-dir", tmp_path / "nothing")  # fmt: skip
    assert code == 0, err
    assert "8 random images (no cifar10 test images here" in out and "top-1 identical 8/8" in out
    assert (tmp_path / "t.pt2.json").is_file()


# ---- the artifacts rules -------------------------------------------------------------------------


def test_nothing_is_overwritten_without_force_and_no_link_is_written_through(tmp_path, teacher_ckpt, data_dir):
    out = tmp_path / "t.safetensors"
    args = ("export", teacher_ckpt, "--format", "safetensors", "--out", out, "--data-dir", data_dir)
    assert cli(*args)[0] == 0
    before = out.read_bytes()
    code, err, _ = cli(*args)
    assert_one_line_error(code, err, "already exists", "--force")
    assert out.read_bytes() == before
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    to_link = ("export", teacher_ckpt, "--format", "safetensors", "--out", link, "--data-dir", data_dir)
    code, err, _ = cli(*to_link)
    assert_one_line_error(code, err, "already exists")
    assert cli(*to_link, "--force")[0] == 0
    assert victim.read_text() == "keep me" and not link.is_symlink()
    assert not [p for p in written(tmp_path) if p.startswith(".")]  # no temporary file left


def test_bad_choices_and_a_missing_extra_are_one_line(tmp_path, teacher_ckpt, monkeypatch):
    code, err, _ = cli("export", teacher_ckpt, "--format", "tflite", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--format must be one of onnx, safetensors, torch-export")
    code, err, _ = cli("export", teacher_ckpt, "--format", "safetensors", "--input", "uint8", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--input applies to onnx and torch-export")
    import kdcache.export

    real = kdcache.export._importable
    monkeypatch.setattr(kdcache.export, "_importable", lambda name: name != "onnxscript" and real(name))
    code, err, _ = cli("export", teacher_ckpt, "--format", "onnx", "--out", tmp_path / "x.onnx")
    assert_one_line_error(code, err, "onnxscript", "pip install 'kdcache[export]'")
    assert written(tmp_path) == []


@pytest.mark.parametrize(
    "factory, fmt, needles",
    [
        ("bessel_net", "onnx", ("does not export to ONNX", "bessel_j0", "--format torch-export")),
        ("branch_net", "torch-export", ("does not export with torch.export", "export_models.py", "safetensors")),
    ],
)
def test_an_architecture_an_exporter_cannot_handle_is_one_line(tmp_path, cifar, factory, fmt, needles):
    spec = f"export_models:{factory}"
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        ckpt = make_checkpoint(tmp_path / "odd.pt", spec, cifar)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    out = tmp_path / "out" / "odd.file"
    done = run_cli("export", str(ckpt), "--format", fmt, "--out", str(out), "--trust-arch", env=env)
    assert_one_line_error(done.returncode, done.stderr, *needles)
    assert written(out.parent) == []


# ---- kdcache predict -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, cifar):
    """The first test images as PNG files (lossless: the pixels kdcache eval sees)."""
    folder = tmp_path_factory.mktemp("pngs")
    for i in range(6):
        Image.fromarray(cifar.test_x[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return folder


def predicted(*args) -> list[dict]:
    code, err, out = cli("predict", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("fmt", [None, "onnx", "safetensors"])
def test_predict_on_pngs_matches_eval(seed_student, png_folder, cifar, cpu, fmt):
    _, ckpt, files, _, _ = seed_student
    rows = predicted(files[fmt] if fmt else ckpt, png_folder, "--topk", "3")
    probs = reference(ckpt, cifar.test_x[:6], cpu).softmax(1)
    assert [Path(r["image"]).name for r in rows] == [f"{i}.png" for i in range(6)]
    for row, p in zip(rows, probs, strict=True):
        values, indices = p.topk(3)
        assert [t["index"] for t in row["top"]] == indices.tolist()
        assert [t["class"] for t in row["top"]] == [cifar.classes[i] for i in indices]
        assert [t["probability"] for t in row["top"]] == pytest.approx(values.tolist(), abs=1e-5)


def test_predict_on_a_jpeg_matches_eval_on_its_decoded_pixels(seed_student, cifar, tmp_path, cpu):
    _, ckpt, files, _, _ = seed_student
    Image.fromarray(cifar.test_x[0].permute(1, 2, 0).numpy()).save(tmp_path / "a.jpg", quality=90)
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")).transpose(2, 0, 1).copy())
    want = reference(ckpt, pixels[None], cpu).softmax(1)[0]
    for model in (ckpt, files["onnx"]):
        top = predicted(model, tmp_path / "a.jpg", "--topk", "10")[0]["top"]
        assert [t["index"] for t in top] == want.topk(10).indices.tolist()
        assert [t["probability"] for t in top] == pytest.approx(want.topk(10).values.tolist(), abs=1e-5)


def test_predict_prints_a_table_and_handles_bad_images(seed_student, png_folder, tmp_path):
    _, ckpt, files, _, _ = seed_student
    code, err, out = cli("predict", files["onnx"], png_folder / "0.png", "--topk", "2")
    assert code == 0, err
    assert "0.png" in out and "#2" in out and "%" in out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, err, _ = cli("predict", ckpt, png_folder / "0.png", bad)
    assert_one_line_error(code, err, "bad.png", "does not decode", "--skip-bad-images")
    code, err, out = cli("predict", ckpt, png_folder / "0.png", bad, "--skip-bad-images", "--json")
    assert code == 0 and [line for line in err.splitlines() if line] == [
        next(line for line in err.splitlines() if "bad.png" in line)
    ]
    assert [Path(r["image"]).name for r in json.loads(out)] == ["0.png"]
    code, err, _ = cli("predict", ckpt, bad, "--skip-bad-images")
    assert_one_line_error(code, err, "no image decoded", started=True)  # after the one skipped-file line
    code, err, _ = cli("predict", ckpt, png_folder, "--topk", "0")
    assert_one_line_error(code, err, "--topk must be >= 1")
    code, err, _ = cli("predict", ckpt, tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere does not exist")


def test_damaged_model_files_are_one_line(seed_student, png_folder, tmp_path):
    _, _, files, _, _ = seed_student
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(files["onnx"].read_bytes()[:5000])
    code, err, _ = cli("predict", truncated, png_folder)
    assert_one_line_error(code, err, "cut.onnx", "not a readable ONNX model")
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes((10**12).to_bytes(8, "little") + b'{"a": {"dtype": "F32"')  # a header that lies
    code, err, _ = cli("predict", crafted, png_folder)
    assert_one_line_error(code, err, "crafted.safetensors", "not a readable safetensors file")
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, bare)
    code, err, _ = cli("predict", bare, png_folder)
    assert_one_line_error(code, err, "no kdcache export metadata")


def test_an_image_folder_checkpoint_exports_and_predicts_as_eval(tmp_path, cpu):
    """An image-folder student at 40 pixels: the check runs on the folder's val images (found through the
    path the checkpoint recorded), and predict on the val files gives eval's answers."""
    from kdcache.folders import scan, write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=4, val_per_class=3)
    data = load_dataset("imagefolder", root, image_size=40)
    ckpt = make_checkpoint(tmp_path / "folder.pt", "resnet9s", data)
    code, err, out = cli("export", ckpt, "--format", "onnx", "--out", tmp_path / "folder.onnx")
    assert code == 0, err
    assert "on 8 imagefolder test images" in out and "top-1 identical 8/8" in out  # 8 of its 9 val images
    _, _, val = scan(root, None)
    probs = reference(ckpt, data.test_x, cpu).softmax(1)
    for model in (ckpt, tmp_path / "folder.onnx"):
        rows = predicted(model, *val.files, "--topk", "1")
        assert [r["top"][0]["index"] for r in rows] == probs.argmax(1).tolist()
        assert [r["top"][0]["probability"] for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)


def test_predict_prepares_images_as_an_image_folder_is_evaluated(tmp_path):
    """The val images of a folder dataset, read by `predict`'s preparation, are the pixels `eval` sees."""
    from kdcache.classify import Classifier, prepare
    from kdcache.folders import scan, write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=4, val_per_class=3)
    data = load_dataset("imagefolder", root, image_size=32)
    _, _, val = scan(root, None)
    model = Classifier(root, "checkpoint", "x", data.classes, 32, "imagefolder", data.options, lambda x: x)
    pixels = torch.stack([torch.from_numpy(prepare(path, model)) for path in val.files])
    assert torch.equal(pixels, data.test_x)
    cifar_like = Classifier(root, "checkpoint", "x", data.classes, 32, "cifar10", {}, lambda x: x)
    square = tmp_path / "square.png"
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(square)
    assert np.array_equal(prepare(square, cifar_like), np.asarray(Image.open(square)).transpose(2, 0, 1))
