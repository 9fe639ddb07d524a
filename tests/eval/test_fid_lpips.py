"""FID and LPIPS from local weights files, on random weights (no pretrained weights can be downloaded here).

References: a compact PyTorch transcription of pytorch-fid 0.3.0's ``InceptionV3([3])`` (``pytorch_fid/inception.py``
with torchvision 0.28's ``BasicConv2d`` / ``InceptionB`` / ``InceptionD`` and the Inception3 stem) and of lpips
0.1.4's ``LPIPS(net=..., version="0.1")`` (``lpips/lpips.py``, ``pretrained_networks.py`` with torchvision's
AlexNet / VGG16 ``features``). The packages themselves cannot run here: both import torchvision, and the PyPI
torchvision 0.28.0 wheel is built against CUDA torch (its ops library needs libtorch_cuda.so, absent next to the
CPU torch 2.13.0 wheel), so ``import torchvision`` fails. The transcription was checked against the real packages
once (torchvision's Python model files loaded without its ops library): identical state-dict names and shapes,
outputs equal to float32 round-off.

Each reference is loaded ``strict=True`` with a random state dict written to a file, and jquant reads the same
file through its loader, so the loaders' file formats and name checks are what is tested. The lpips package's own
v0.1 linear heads are used where the package is installed (its wheel ships them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from jquant.models import lpips_net

from jquant.eval.fid import fid, inception_features, load_inception
from jquant.eval.lpips import load_lpips, lpips

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

# ---- the PyTorch references (transcribed; see the module docstring) ----

class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, **kw):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_in, c_out, bias=False, **kw), nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(nn.Module):
    def __init__(self, c, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c, 64, kernel_size=1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c, 48, kernel_size=1), BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c, pool_features, kernel_size=1)

    def forward(self, x):
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), pool], 1)


class InceptionB(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch3x3 = BasicConv2d(c, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, c, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, d, pool], 1)


class InceptionD(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(c, 192, kernel_size=1), BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):  # FIDInceptionE_1 (average pool) and FIDInceptionE_2 (max pool)
    def __init__(self, c, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3([3]) on torchvision's Inception3(num_classes=1008, aux_logits=False)."""

    def __init__(self, resize_input):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), FIDInceptionE(1280, False), FIDInceptionE(2048, True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # x [B, 3, H, W] in [0, 1]
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]


_ALEX = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)]


def _vgg16_features():
    layers, c_in = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
        c_in = c_in if v == "M" else v
    return layers


class LPIPSReference(nn.Module):
    """lpips.LPIPS(net=..., version="0.1") in eval mode; ``features`` holds torchvision's layer indices."""

    SLICES: ClassVar = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}  # pretrained_networks.py's slice ends

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.features = nn.Sequential(*(list(_ALEX) if net == "alex" else _vgg16_features()))
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.lins = nn.ModuleList([nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
                                   for c in lpips_net.channels(net)])

    def taps(self, x):
        out, start = [], 0
        for end in self.SLICES[self.net]:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def forward(self, a, b):  # [B, 3, H, W] in [-1, 1]
        total = 0
        for fa, fb, lin in zip(self.taps((a - self.shift) / self.scale), self.taps((b - self.shift) / self.scale),
                               self.lins):
            na = fa / (torch.sqrt(torch.sum(fa ** 2, dim=1, keepdim=True)) + 1e-10)
            nb = fb / (torch.sqrt(torch.sum(fb ** 2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((na - nb) ** 2).mean([2, 3], keepdim=True)
        return total[:, 0, 0, 0]


# ---- random weights and images ----

def _random_state(module: nn.Module, rng) -> dict:
    """A random state dict of ``module``: He-normal conv / linear weights, BatchNorm statistics near identity."""
    state = {}
    for name, value in module.state_dict().items():
        shape = tuple(value.shape)
        if name in ("shift", "scale"):  # LPIPS' fixed scaling layer
            array = value.numpy()
        elif name.endswith("num_batches_tracked"):
            array = np.asarray(rng.integers(0, 1000), np.int64)
        elif name.endswith(("running_var", "bn.weight")):
            array = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("running_mean", "bias")):
            array = rng.normal(0, 0.1, shape)
        elif name.startswith("lins."):
            array = np.abs(rng.normal(0, 0.1, shape))  # the heads are non-negative (lpips clamps them in training)
        else:
            array = rng.normal(0, (2.0 / np.prod(shape[1:])) ** 0.5, shape)
        state[name] = torch.from_numpy(np.asarray(array, np.int64 if array.dtype == np.int64 else np.float32))
    return state


def _images(rng, n, size):
    """Smooth random images [n, size, size, 3] in [-1, 1] (low-frequency waves plus a little noise)."""
    y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    f = rng.uniform(0.5, 3, (n, 1, 1, 3, 2))
    phase = rng.uniform(0, 6, (n, 1, 1, 3))
    waves = np.sin(2 * np.pi * (f[..., 0] * y[None, :, :, None] + f[..., 1] * x[None, :, :, None]) + phase)
    return np.clip(0.8 * waves + rng.normal(0, 0.1, waves.shape), -1, 1).astype(np.float32)


def _nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """(path of a random pytorch-fid state dict .pth, the state dict)."""
    state = _random_state(FIDInceptionV3(resize_input=False), np.random.default_rng())
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def inception_net(inception_file):
    return load_inception(inception_file[0])


def _reference_features(state, images, resize_input):
    ref = FIDInceptionV3(resize_input=resize_input)
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        return ref.eval()(_nchw((images + 1) / 2)).double().numpy()


def _relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- FID ----

def test_inception_features_match_pytorch_fid(inception_file, inception_net):
    rng = np.random.default_rng()
    images = _images(rng, 4, 75)  # the smallest input; every Inception check runs batches of 2 (one compile per size)
    ours = inception_features(images, inception_net, batch_size=2, resize_input=False)
    assert ours.shape == (4, 2048) and ours.dtype == np.float64
    assert _relative_error(ours, _reference_features(inception_file[1], images, False)) < 1e-4


def test_inception_299_resize_path_matches_pytorch_fid(inception_file, inception_net):
    rng = np.random.default_rng()
    images = _images(rng, 2, 48)  # upsampled to 299 x 299 by both
    ours = inception_features(images, inception_net)
    assert _relative_error(ours, _reference_features(inception_file[1], images, True)) < 1e-4


def _fd_float64(a, b):
    """|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^(1/2), with tr (S_a S_b)^(1/2) the nuclear norm of
    X_a X_bᵀ / sqrt((n - 1)(m - 1)) for centred features X (S = Xᵀ X / (n - 1)): exact for any rank."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    nuclear = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    return (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(xa * xa) / (n - 1) + np.sum(xb * xb) / (m - 1)
            - 2 * nuclear)


def test_fid_is_the_frechet_distance_of_the_reference_features(inception_file, inception_net):
    rng = np.random.default_rng()
    a, b = _images(rng, 4, 75), _images(rng, 2, 75)
    value = fid(a, b, weights=inception_net, batch_size=2, resize_input=False)
    ref_a = _reference_features(inception_file[1], a, False)
    expected = _fd_float64(ref_a, _reference_features(inception_file[1], b, False))
    assert abs(value - expected) <= 1e-3 * expected  # (FID of a set with itself: test_eval_options_and_...)


def test_safetensors_and_npz_files_load_the_same_network(inception_file, inception_net, tmp_path):
    from safetensors.numpy import save_file

    tensors = {k: v.numpy() for k, v in inception_file[1].items()}
    save_file(tensors, tmp_path / "inception.safetensors")
    np.savez(tmp_path / "inception.npz", **tensors)
    for name in ("inception.safetensors", "inception.npz"):
        other = load_inception(tmp_path / name)
        np.testing.assert_array_equal(other.Mixed_7c.branch_pool.conv.kernel[...],
                                      inception_net.Mixed_7c.branch_pool.conv.kernel[...])
        np.testing.assert_array_equal(other.Conv2d_1a_3x3.conv.bias[...], inception_net.Conv2d_1a_3x3.conv.bias[...])


def _broken(state: dict, change: str) -> dict:
    state = dict(state)
    if change == "missing":
        del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    elif change == "unexpected":
        state["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    else:
        state["Mixed_6c.branch7x7dbl_3.conv.weight"] = torch.zeros(160, 160, 7, 1)
    return state


@pytest.mark.parametrize("change, message", [("missing", "'Mixed_6c.branch7x7dbl_3.bn.running_var' is missing"),
                                             ("unexpected", "AuxLogits.conv0.conv.weight"),
                                             ("mis-shaped", "'Mixed_6c.branch7x7dbl_3.conv.weight' has shape")])
def test_bad_inception_state_dicts_are_refused_naming_file_and_tensor(inception_file, tmp_path, change, message):
    path = tmp_path / f"{change}.pth"
    torch.save(_broken(inception_file[1], change), path)
    with pytest.raises(ValueError, match=message) as err:
        load_inception(path)
    assert str(path) in str(err.value)


def test_bad_paths_and_images_are_refused(inception_net, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must end in one of \.pth"):
        load_inception(tmp_path / "weights.bin")
    (tmp_path / "damaged.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="damaged.pth is not a readable PyTorch state dict"):
        load_inception(tmp_path / "damaged.pth")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_inception(tmp_path / "damaged.safetensors")
    images = _images(np.random.default_rng(), 2, 75)
    with pytest.raises(ValueError, match="pixels / 127.5 - 1"):
        inception_features((images * 127 + 128).astype(np.uint8), inception_net)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        inception_features(images * 3, inception_net)
    with pytest.raises(ValueError, match="H, W >= 75"):
        inception_features(images[:, :64, :64], inception_net, resize_input=False)
    with pytest.raises(ValueError, match="at least 2 images"):  # refused before the weights are even read
        fid(images, images[:1], weights=tmp_path / "never-read.pth")


# ---- LPIPS ----

def _lpips_files(tmp_path, net, rng, package_heads):
    """(backbone .pth, linear-head file, reference module) with random backbone weights; the heads are the lpips
    package's v0.1 file when ``package_heads``, else random ones written as .npz."""
    ref = LPIPSReference(net)
    state = _random_state(ref, rng)
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(8, 4)  # torchvision's head: present in the file, unused
    torch.save(backbone, tmp_path / f"{net}-backbone.pth")
    if package_heads:
        heads = Path(importlib.util.find_spec("lpips").submodule_search_locations[0]) / "weights" / "v0.1" / f"{net}.pth"
        linear = {k: v for k, v in torch.load(heads, map_location="cpu", weights_only=True).items()}
    else:
        heads = tmp_path / f"{net}-lin.npz"
        linear = {f"lin{k.split('.')[1]}.model.1.weight": v for k, v in state.items() if k.startswith("lins.")}
        np.savez(heads, **{k: v.numpy() for k, v in linear.items()})
    ref.load_state_dict({**state, **{f"lins.{k[3]}.1.weight": v for k, v in linear.items()}}, strict=True)
    return tmp_path / f"{net}-backbone.pth", heads, ref.eval()


@pytest.mark.parametrize("package_heads", [False, True], ids=["random-heads", "lpips-package-heads"])
@pytest.mark.parametrize("net, size", [("alex", 64), ("vgg", 32)])
def test_lpips_matches_the_lpips_package(tmp_path, net, size, package_heads):
    if package_heads and importlib.util.find_spec("lpips") is None:
        pytest.skip("the lpips package (which ships the v0.1 linear heads) is not installed")
    rng = np.random.default_rng()
    backbone, heads, ref = _lpips_files(tmp_path, net, rng, package_heads)
    model = load_lpips(backbone, heads)  # net read from the backbone file
    assert model.net == net
    a, b = _images(rng, 3, size), _images(rng, 3, size)
    b[0] = np.clip(a[0] + rng.normal(0, 0.05, a[0].shape), -1, 1)  # one similar pair
    ours = lpips(a, b, model, batch_size=2)
    with torch.no_grad():
        expected = ref(_nchw(a), _nchw(b)).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7)
    assert ours[0] < ours[1:].min()
    assert np.all(np.abs(lpips(a, a, model)) < 1e-9)  # two batch rows of one image: zero up to round-off


def test_bad_lpips_files_are_refused(tmp_path):
    rng = np.random.default_rng()
    backbone, heads, _ = _lpips_files(tmp_path, "alex", rng, False)
    vgg_backbone, vgg_heads, _ = _lpips_files(tmp_path, "vgg", rng, False)
    with pytest.raises(ValueError, match=r"'lin1.model.1.weight' has shape \(1, 128, 1, 1\)") as err:
        load_lpips(backbone, vgg_heads)
    assert str(vgg_heads) in str(err.value)
    with pytest.raises(ValueError, match="'features.3.weight' is missing"):
        load_lpips(vgg_backbone, heads, net="alex")
    torch.save({"features.0.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a torchvision AlexNet or VGG16"):
        load_lpips(tmp_path / "resnet.pth", heads)
    with pytest.raises(ValueError, match="net='squeeze'"):
        load_lpips(backbone, heads, net="squeeze")
    with pytest.raises(FileNotFoundError, match="LPIPS linear-head weights"):
        load_lpips(backbone, tmp_path / "alex.pth")


# ---- jquant eval on text-to-image pipelines ----

def test_eval_options_and_reference_metrics(inception_net, tmp_path):
    import argparse

    from jquant.cli_image import (
        add_image_eval_options,
        evaluate,
        reference_metrics,
        resize_to,
    )
    from jquant.data.scenes import emoji_scenes

    rng = np.random.default_rng()
    backbone, heads, _ = _lpips_files(tmp_path, "alex", rng, False)
    parser = argparse.ArgumentParser()
    add_image_eval_options(parser.add_argument_group("text-to-image models"))
    args = parser.parse_args(["--fid-weights", "inception.pth", "--lpips-weights", str(backbone), str(heads)])
    assert args.fid_weights == "inception.pth" and args.lpips_weights == [str(backbone), str(heads)]
    # the weights are read before any pipeline is loaded or image generated: a bad file fails first
    with pytest.raises(FileNotFoundError, match="inception.pth is not a file"):
        evaluate(argparse.Namespace(**vars(args), model="no-such-pipeline"), console=None)

    # FID against the test split's scenes at the images' size, of those very scenes (16 px: pooled from 64 px): a set
    # with itself, FD = 2 tr S - 2 tr (S S)^(1/2) = 0 up to the round-off of that cancellation
    real = resize_to(emoji_scenes("test", 2, 64, 0, vocabulary="reference-32", objects=(1,)).images / 127.5 - 1, 16)
    real = real.astype(np.float32)
    other = np.clip(real + rng.normal(0, 0.3, real.shape), -1, 1).astype(np.float32)
    report = reference_metrics(real, other, fid_net=inception_net, lpips_net=load_lpips(backbone, heads))
    scale = 2 * np.var(inception_features(real, inception_net), axis=0, ddof=1).sum()
    assert abs(report["fid"]) <= 1e-5 * scale and report["lpips"] > 0
    assert reference_metrics(real, None, lpips_net=load_lpips(backbone, heads)) == {}
