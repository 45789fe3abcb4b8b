"""digits_cnn: a small CNN trained on scikit-learn's bundled 8x8 handwritten digits.

Input ``input`` float32 [N,1,8,8] (pixel values / 16), output ``logits`` [N,10].
Three 3x3 Conv + BatchNormalization + ReLU blocks and two fully connected layers
(~0.16M parameters). The FP32 model is committed as ``models/digits_cnn.onnx`` (with its
BatchNormalization nodes kept, not folded) so no torch is needed to use it.

Data: ``sklearn.datasets.load_digits`` split with ``train_test_split(test_size=0.25,
random_state=0)``: training + calibration from the train split (1347 images), evaluation
on the test split (450 images). Metric: ``{"accuracy"}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._common import PACKAGE_DIR, check_onnx, export_torch, require_torch, run_batched, session

COMMITTED = PACKAGE_DIR / "digits_cnn.onnx"
CALIB_NPZ = PACKAGE_DIR / "digits_calib.npz"
INPUT = "input"
OUTPUT = "logits"
SEED = 0


def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0)
    return x_tr, y_tr, x_te, y_te


def _net():
    torch = require_torch()
    nn = torch.nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *block(1, 32),                      # 8x8
                *block(32, 64), nn.MaxPool2d(2),    # 4x4
                *block(64, 128), nn.MaxPool2d(2),   # 2x2
            )
            self.fc1 = nn.Linear(128 * 2 * 2, 128)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(self.relu(self.fc1(x)))

    return DigitsCNN()


def build(dest: Path) -> None:
    """Train (deterministic, ~10 s on 2 cores) and export to ``dest``."""
    torch = require_torch()
    torch.manual_seed(SEED)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_tr, y_tr, x_te, y_te = _split()
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for _epoch in range(40):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            # light augmentation: random 1-pixel shifts
            sh = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=sh, dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    export_torch(net, (torch.zeros(1, 1, 8, 8),), dest, [INPUT], [OUTPUT],
                 {INPUT: {0: "N"}, OUTPUT: {0: "N"}})
    check_onnx(dest)


def write_calib_npz(path: Path = CALIB_NPZ, count: int = 16) -> None:
    """The README demo's calibration file: key ``input``, array [count,1,8,8] float32."""
    feeds = calibration_feeds(count, seed=0)
    np.savez(path, **{INPUT: np.concatenate([f[INPUT] for f in feeds])})


def calibration_feeds(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    x_tr, _, _, _ = _split()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x_tr), size=count, replace=count > len(x_tr))
    return [{INPUT: np.ascontiguousarray(x_tr[i:i + 1])} for i in idx]


def evaluate(path, limit: int | None = None) -> dict[str, float]:
    _, _, x_te, y_te = _split()
    if limit is not None:
        x_te, y_te = x_te[:limit], y_te[:limit]
    sess = session(path)
    logits = run_batched(sess, sess.get_inputs()[0].name, x_te)
    return {"accuracy": float((logits.argmax(axis=1) == y_te).mean())}
