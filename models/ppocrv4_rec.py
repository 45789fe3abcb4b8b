"""ppocrv4_rec: PaddleOCR's PP-OCRv4 text-line recogniser, as shipped by RapidOCR.

File: ``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx`` in the wheel
``rapidocr_onnxruntime==1.3.24``, used byte for byte (its weights live in Constant nodes,
not initializers). Input ``x`` float32 [N,3,48,W] (BGR, (v/255-0.5)/0.5), output
``softmax_11.tmp_0`` [N, W/8, 6625] (CTC over the character dictionary, which is stored
in the model's metadata under ``character``; index 0 is the CTC blank, the last is space).

Data: single text lines rendered with Pillow in DejaVu fonts (Debian
``fonts-dejavu-core``): digits, English words, and mixes, generated deterministically;
calibration lines use a different seed and never repeat an evaluation line.
Preprocessing follows PaddleOCR's recogniser (height 48, aspect kept, width at least 320,
right-padded with zeros). CTC greedy decoding. Metrics: ``exact`` (fraction of lines read
exactly, leading/trailing spaces ignored) and ``cer`` (character error rate: total edit
distance / total reference characters).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from pathlib import Path

import numpy as np

from ._common import ModelUnavailable, check_onnx, require_pillow, session, wheel_dir

PKG = ("rapidocr_onnxruntime", "1.3.24")
MODEL_FILE = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
FONT_DIR = Path(os.environ.get("DEJAVU_FONT_DIR", "/usr/share/fonts/truetype/dejavu"))
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")
HEIGHT = 48
MIN_WIDTH = 320
EVAL_LINES = 200
EVAL_SEED = 1234
CALIB_SEED = 98765

WORDS = """
time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work
government number night point home water room mother area money story fact month lot
right study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea
kid body information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher force
education foot boy age policy music market sense nation plan college interest death
experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player
record paper space ground form event official matter center couple site project activity
star table need court oil situation cost industry figure street image phone data picture
practice piece land product doctor wall patient worker news test movie north love support
technology step baby computer type attention film tree source organization hair window
evidence population truth song energy garden river bridge market orange purple silver
""".split()


# --------------------------------------------------------------------------- model
def build(dest: Path) -> None:
    """Copy the model out of the rapidocr wheel, unchanged."""
    root = wheel_dir(*PKG, [MODEL_FILE])
    shutil.copyfile(root / MODEL_FILE, dest)
    check_onnx(dest)


@functools.lru_cache(maxsize=None)
def characters() -> tuple[str, ...]:
    """CTC classes: blank, the dictionary from the FP32 model's metadata, then space."""
    from . import fetch

    sess = session(fetch("ppocrv4_rec"), threads=1)
    meta = sess.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        raise ModelUnavailable("ppocrv4_rec's model has no 'character' metadata; delete the cache and fetch again")
    return ("<blank>", *meta["character"].splitlines(), " ")


def ctc_decode(probs: np.ndarray) -> list[str]:
    """Greedy CTC decoding of [N, T, C] scores (repeats merged, blanks dropped)."""
    chars = characters()
    out = []
    for seq in probs.argmax(axis=2):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        keep &= seq != 0
        out.append("".join(chars[i] for i in seq[keep] if i < len(chars)))
    return out


# --------------------------------------------------------------------------- data
def _make_line(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 6)
    if kind == 0:  # plain digits, possibly grouped
        groups = rng.integers(1, 4)
        return " ".join(str(rng.integers(10, 100000)) for _ in range(groups))
    if kind == 1:  # a date, a price or a time
        sub = rng.integers(0, 3)
        if sub == 0:
            return f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        if sub == 1:
            return f"{rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
        return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=rng.integers(1, 4))]
    if kind in (2, 3):  # English words in lower, Title or UPPER case
        case = rng.integers(0, 3)
        words = [w.upper() if case == 2 else w.capitalize() if case == 1 else w for w in words]
        return " ".join(words)
    if kind == 4:  # words and numbers
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.integers(1, 1000)))
        return " ".join(w.capitalize() if i == 0 else w for i, w in enumerate(words))
    # codes like AB-1234 or Room 42B
    letters = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, size=rng.integers(2, 4)))
    if rng.integers(0, 2):
        return f"{letters}-{rng.integers(100, 10000)}"
    return f"{words[0].capitalize()} {rng.integers(1, 100)}{letters[0]}"


@functools.lru_cache(maxsize=None)
def _lines(seed: int, count: int, exclude: frozenset = frozenset()) -> tuple[str, ...]:
    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    while len(out) < count:
        s = _make_line(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return tuple(out)


def eval_lines() -> tuple[str, ...]:
    return _lines(EVAL_SEED, EVAL_LINES)


def _font(name: str, size: int):
    from PIL import ImageFont

    path = FONT_DIR / name
    if not path.exists():
        raise ModelUnavailable(f"font {path} is missing; run: apt-get install fonts-dejavu-core")
    return ImageFont.truetype(str(path), size)


def render(text: str, index: int) -> np.ndarray:
    """Render ``text`` as an RGB uint8 line image; style picked deterministically by index."""
    require_pillow()
    from PIL import Image, ImageDraw

    font = _font(FONTS[index % len(FONTS)], (22, 26, 30, 34, 38)[(index // len(FONTS)) % 5])
    ink = (0, 0, 0) if index % 3 else (40, 40, 90)
    paper = (255, 255, 255) if index % 4 else (235, 230, 215)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = 8 + index % 5, 6 + index % 3
    im = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), paper)
    ImageDraw.Draw(im).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    arr = np.asarray(im)
    if index % 5 == 0:  # a noisy scan
        noise = np.random.default_rng(index).normal(0.0, 14.0, arr.shape)
        arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
    return arr


def preprocess(img: np.ndarray) -> np.ndarray:
    """PaddleOCR rec preprocessing of one RGB uint8 image -> [1,3,48,W] float32 (BGR)."""
    from PIL import Image

    h, w = img.shape[:2]
    ratio = w / float(h)
    width = max(MIN_WIDTH, int(HEIGHT * ratio))
    resized_w = min(width, int(math.ceil(HEIGHT * ratio)))
    im = Image.fromarray(img).resize((resized_w, HEIGHT), Image.BILINEAR)
    x = np.asarray(im, np.float32)[:, :, ::-1].transpose(2, 0, 1) / 255.0  # BGR, CHW
    x = (x - 0.5) / 0.5
    out = np.zeros((1, 3, HEIGHT, width), np.float32)
    out[0, :, :, :resized_w] = x
    return out


@functools.lru_cache(maxsize=None)
def _eval_inputs() -> tuple[np.ndarray, ...]:
    return tuple(preprocess(render(t, i)) for i, t in enumerate(eval_lines()))


def calibration_feeds(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    texts = _lines(CALIB_SEED + seed, count, frozenset(eval_lines()))
    # styles offset by seed so calibration also varies fonts/sizes with the seed
    return [{"x": preprocess(render(t, i + 7 * seed))} for i, t in enumerate(texts)]


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def recognise(path, images: list[np.ndarray]) -> list[str]:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return [ctc_decode(sess.run(None, {name: x})[0])[0] for x in images]


def evaluate(path, limit: int | None = None) -> dict[str, float]:
    texts = eval_lines()[:limit]
    preds = recognise(path, list(_eval_inputs()[: len(texts)]))
    exact = sum(p.strip() == t for p, t in zip(preds, texts))
    edits = sum(_edit_distance(p.strip(), t) for p, t in zip(preds, texts))
    return {"exact": exact / len(texts), "cer": edits / sum(len(t) for t in texts)}
