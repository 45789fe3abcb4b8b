"""fmnist_cnn: a CNN trained for 2 epochs on Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Input ``input`` float32 [N,1,28,28] (pixel values / 255), output ``logits`` [N,10].
Four 3x3 Conv + BatchNormalization + ReLU blocks (max pooling after the 2nd and 4th) and
two fully connected layers (~0.87M parameters); BatchNormalization kept as nodes.

Data: ``/usr/share/datasets/fashion-mnist/*.gz``. Training and calibration use the 60k
training set; evaluation uses the 10k test set. Metric: ``{"accuracy"}``.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from ._common import ModelUnavailable, check_onnx, export_torch, require_torch, run_batched, session

DATA_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
INPUT = "input"
OUTPUT = "logits"
SEED = 0
EPOCHS = 2


def _read(key: str) -> np.ndarray:
    path = DATA_DIR / FILES[key]
    if not path.exists():
        raise ModelUnavailable(
            f"Fashion-MNIST file {path} is missing; run: apt-get install dataset-fashion-mnist"
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if key.endswith("_x"):
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _data(split: str) -> tuple[np.ndarray, np.ndarray]:
    x = _read(f"{split}_x").astype(np.float32) / 255.0
    y = _read(f"{split}_y")
    return x, y


def _net():
    torch = require_torch()
    nn = torch.nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class FashionCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *block(1, 32), *block(32, 32), nn.MaxPool2d(2),   # 14x14
                *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 7x7
            )
            self.fc1 = nn.Linear(64 * 7 * 7, 256)
            self.relu = nn.ReLU()
            self.drop = nn.Dropout(0.25)
            self.fc2 = nn.Linear(256, 10)

        def forward(self, x):
            x = torch.flatten(self.features(x), 1)
            return self.fc2(self.drop(self.relu(self.fc1(x))))

    return FashionCNN()


def build(dest: Path) -> None:
    """Train 2 epochs (~2-3 min on 2 cores, fixed seed) and export to ``dest``."""
    torch = require_torch()
    x_tr, y_tr = _data("train")
    torch.manual_seed(SEED)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    net = _net()
    steps_per_epoch = (len(x_tr) + 127) // 128
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=EPOCHS * steps_per_epoch, pct_start=0.2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for _epoch in range(EPOCHS):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    export_torch(net, (torch.zeros(1, 1, 28, 28),), dest, [INPUT], [OUTPUT],
                 {INPUT: {0: "N"}, OUTPUT: {0: "N"}})
    check_onnx(dest)


def calibration_feeds(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    x_tr, _ = _data("train")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x_tr), size=count, replace=count > len(x_tr))
    return [{INPUT: np.ascontiguousarray(x_tr[i:i + 1])} for i in idx]


def evaluate(path, limit: int | None = None) -> dict[str, float]:
    x_te, y_te = _data("test")
    if limit is not None:
        x_te, y_te = x_te[:limit], y_te[:limit]
    sess = session(path)
    logits = run_batched(sess, sess.get_inputs()[0].name, x_te, batch=500)
    return {"accuracy": float((logits.argmax(axis=1) == y_te).mean())}
