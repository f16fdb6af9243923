"""The registry builds the right models; checkpoints rebuild them from the file alone."""

import pytest
import torch
from torch import nn

from kdcache.checkpoints import load_checkpoint, save_checkpoint
from kdcache.errors import KDCacheError
from kdcache.models import ARCHS, build, num_params


@pytest.mark.parametrize(
    "arch,params",
    [("seed-cnn-teacher", 1_186_986), ("seed-cnn-student", 267_738), ("resnet9s", 412_954), ("resnet18", 11_173_962)],
)
def test_parameter_counts(arch, params):
    assert num_params(build(arch, 10)) == params


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnets_have_the_cifar_stem(arch):
    model = build(arch, 10)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(KDCacheError, match="unknown architecture"):
        build("vgg11", 10)


META = {
    "num_classes": 10,
    "dataset": "cifar10",
    "dataset_fingerprint": "f" * 64,
    "normalize_mean": [0.5] * 3,
    "normalize_std": [0.25] * 3,
    "metrics": {"test_acc": 0.5},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_rebuilds_the_same_model_in_eval_mode(tmp_path, arch):
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, arch=arch, meta=META)
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta["arch"] == arch and meta["dataset_fingerprint"] == META["dataset_fingerprint"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # Trained stem weights survive: the stem is built before loading, never replaced after.
    first = next(iter(loaded.state_dict().values()))
    assert torch.equal(first, next(iter(model.state_dict().values())))


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, build("seed-cnn-student", 10), arch="seed-cnn-student", meta=META)
    with pytest.raises(KDCacheError, match="seed-cnn-student checkpoint, not resnet18"):
        load_checkpoint(path, arch="resnet18")


def test_model_specs_build_with_the_stem_their_image_size_needs(tmp_path):
    from torch import nn

    from kdcache.checkpoints import load_checkpoint, save_checkpoint
    from kdcache.models import build

    small = build("torchvision:resnet18", 7, image_size=32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity) and small.fc.out_features == 7
    large = build("torchvision:resnet18", 7, image_size=224)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, nn.MaxPool2d)
    assert build("resnet18", 7, image_size=128).conv1.kernel_size == (7, 7)  # named ResNets follow the same rule
    own = build("byo_models:make_net", 5)
    assert own(torch.zeros(2, 3, 40, 40)).shape == (2, 5)
    # the checkpoint records the spec and image size: load_checkpoint rebuilds it from the file alone
    meta = {
        "num_classes": 7,
        "dataset": "imagefolder",
        "dataset_fingerprint": "x",
        "normalize_mean": [0.5] * 3,
        "normalize_std": [0.2] * 3,
        "image_size": 224,
    }
    save_checkpoint(tmp_path / "m.pt", large, arch="torchvision:resnet18", meta=meta)
    model, got = load_checkpoint(tmp_path / "m.pt")
    assert got["arch"] == "torchvision:resnet18" and model.conv1.stride == (2, 2)
    for a, b in zip(model.state_dict().values(), large.state_dict().values(), strict=False):
        assert torch.equal(a, b)


def test_seed_cnns_take_larger_images_without_new_parameters():
    from kdcache.models import build, num_params

    for name in ("seed-cnn-teacher", "seed-cnn-student", "resnet9s"):
        m = build(name, 10)
        assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 10) and num_params(m) == num_params(build(name, 10, 64))


def test_timm_spec_without_timm_says_how_to_install(monkeypatch):
    import sys

    from kdcache.errors import KDCacheError
    from kdcache.models import build

    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(KDCacheError, match=r"pip install 'kdcache\[timm\]'"):
        build("timm:resnet18", 10)


def test_timm_models_build_with_the_stem_rule_when_timm_is_installed():
    pytest.importorskip("timm")
    from kdcache.models import build

    small = build("timm:resnet18", 7, image_size=32)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert build("timm:resnet18", 7, image_size=224).conv1.stride == (2, 2)
