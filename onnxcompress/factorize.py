"""Truncated SVD of a weight matrix, plain or activation-aware, for the low-rank passes.

A layer computes ``Y = X·W`` with ``W`` of shape K×N (K inputs, N outputs). A rank-r
factorisation ``W ≈ A·B`` (A: K×r, B: r×N) replaces it by two thinner products and pays
when ``r·(K + N) < K·N``; the same inequality holds for the multiply-accumulates, since every
output row costs ``K·N`` before and ``r·(K + N)`` after.

Plain (``gram=None``): the best rank-r approximation in the Frobenius norm is the truncated
SVD ``W = U·Σ·Vᵀ`` (Eckart–Young); the factors split the singular values evenly,
``A = U_r·√Σ_r`` and ``B = √Σ_r·V_rᵀ``, so both have the same scale (kinder to float16 and to
a later int8 quantisation than putting all of Σ on one side).

Activation-aware (``gram = XᵀX`` of calibration inputs, as in SVD-LLM / ASVD): minimise the
error of the layer's *output* ``‖X·W − X·A·B‖``. With a covariance estimate ``C`` of the
inputs, ``G = C/c + λ·I`` (``c`` the mean diagonal of C, ``λ = damping``: a ridge that keeps
directions the data never visits from blowing up) and a factor ``S`` with ``SᵀS = G`` (here
the upper Cholesky factor; any such S gives the same product), ``‖X·Δ‖² ∝ ‖S·Δ‖²``, so the
best rank-r fit is the truncated SVD of ``S·W = U·Σ·Vᵀ`` mapped back: ``A = S⁻¹·U_r·√Σ_r``,
``B = √Σ_r·V_rᵀ``. The energy share is measured on that whitened spectrum: 1 − energy is
the relative squared output error on the calibration data (up to damping and shrinkage).

The passes stream :class:`Moments` and estimate C with Ledoit–Wolf shrinkage,
``(1−α)·XᵀX/n + α·μ·I``: with few rows for many inputs (16 pooled images for a 1280-input
classifier) the raw XᵀX spans only the calibration rows, the whitened spectrum then reaches
any energy at a tiny rank, and the factors fit those rows and nothing else (measured:
mobilenet_v2's classifier at data-aware energy 0.99 kept rank 8 and top-1 agreement 0.0
without shrinkage, 0.89 with it). With many rows α is near 0 and nothing changes. Rows from
one image or one sentence are correlated, so α is, if anything, too small.

Exact limit: at full rank ``r = min(K, N)`` both give ``A·B = W`` to float rounding (tested
through :func:`low_rank_factors`; the passes refuse full rank since it does not shrink).

Cost: arithmetic in float64. Matrices whose smaller side is under 512 get one LAPACK SVD
(spectrum and factors at once, ~0.1 s for 384×1536). Larger ones get their spectrum from the
eigenvalues of the smaller Gram matrix (4× faster than singular values alone), then, if the
chosen rank is at most a tenth of the full rank, a randomized SVD (scikit-learn,
``n_iter=7``, 10 oversamples, seeded) whose error is within 0.1% of the exact truncation and
which is 5–10× faster (measured on 1024×1024, 1024×4096, 2048×2048 spectra decaying like
1/√i: error ratio 1.0002–1.0008); above a tenth it would need more power iterations than a
full SVD costs, so the full SVD is used. LAPACK (SVD, eigenvalues, Cholesky) runs on one BLAS
thread for matrices up to 2048 on their smaller side: OpenBLAS's threads gain little there
and make it 5–100× slower when the cores are shared with other processes (measured on a
loaded 2-core machine: a 384×1536 SVD 0.13 s on one thread, up to 10 s on two; a 1536×1536
Cholesky 0.04 s against 0.9 s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import numpy as np
import onnx_ir as ir

from onnxcompress.initializers import take_over
from onnxcompress.options import PassOptions, option
from onnxcompress.pass_base import node_label

SMALL_SIDE = 512  # below this smaller side: one full SVD gives spectrum and factors
RANDOMIZED_SHARE = 0.1  # randomized SVD when rank <= this share of the full rank
RANDOMIZED_ITERATIONS = 7
RANDOMIZED_OVERSAMPLES = 10
SINGLE_THREAD_SIDE = 2048


@dataclasses.dataclass(frozen=True)
class RankRule:
    """How a rank is chosen: a fixed ``rank``, a ``ratio`` of the full rank, or an ``energy``
    share of squared singular values. The first that is set wins (rank > ratio > energy);
    pass options make them exclusive before they get here."""

    rank: int = 0
    ratio: float = 0.0
    energy: float = 0.95

    def choose(self, squares: np.ndarray) -> int:
        """The rank for a spectrum of squared singular values (descending)."""
        full = len(squares)
        if self.rank > 0:
            return self.rank
        if self.ratio > 0:
            return max(1, min(full, math.ceil(self.ratio * full - 1e-9)))
        total = float(np.sum(squares))
        if total <= 0.0:
            return 0
        cumulative = np.cumsum(squares) / total
        return int(min(full, np.searchsorted(cumulative, self.energy * (1 - 1e-12)) + 1))


@dataclasses.dataclass
class Plan:
    """A rank chosen for one matrix; :meth:`factors` computes A and B."""

    matrix: np.ndarray  # the matrix whose SVD is truncated (S·W when whitened), float64
    weight_shape: tuple[int, int]  # K, N of W
    squares: np.ndarray  # squared singular values of ``matrix``, descending
    rank: int
    whitener: np.ndarray | None  # S (upper triangular), when activation-aware
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    shrinkage: float | None = None  # Ledoit–Wolf weight of the identity, when activation-aware

    @property
    def full_rank(self) -> int:
        return min(self.weight_shape)

    @property
    def energy(self) -> float:
        """Share of squared singular values kept at this rank (1.0 for a zero matrix)."""
        total = float(np.sum(self.squares))
        return float(np.sum(self.squares[: self.rank]) / total) if total > 0 else 1.0

    @property
    def params_before(self) -> int:
        k, n = self.weight_shape
        return k * n

    @property
    def params_after(self) -> int:
        k, n = self.weight_shape
        return self.rank * (k + n)

    @property
    def shrinks(self) -> bool:
        return 0 < self.rank <= self.full_rank and self.params_after < self.params_before

    def method(self) -> str:
        if self.svd is not None or not _randomized(self.matrix.shape, self.rank):
            return "svd"
        return "randomized svd"

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """A (K×r) and B (r×N) in float64 with A·B ≈ W."""
        r = self.rank
        if self.svd is not None:
            u, s, vt = self.svd
            u, s, vt = u[:, :r], s[:r], vt[:r]
        elif _randomized(self.matrix.shape, r):
            from sklearn.utils.extmath import randomized_svd

            with _lapack_threads(self.matrix.shape):
                u, s, vt = randomized_svd(self.matrix, r, n_oversamples=RANDOMIZED_OVERSAMPLES,
                                          n_iter=RANDOMIZED_ITERATIONS, random_state=0)
        else:
            with _lapack_threads(self.matrix.shape):
                u, s, vt = np.linalg.svd(self.matrix, full_matrices=False)
            u, s, vt = u[:, :r], s[:r], vt[:r]
        root = np.sqrt(s)
        a = u * root
        b = root[:, None] * vt
        if self.whitener is not None:
            from scipy.linalg import solve_triangular

            a = solve_triangular(self.whitener, a, lower=False)
        return a, b


def plan(weight: np.ndarray, rule: RankRule, gram: np.ndarray | Moments | None = None, damping: float = 0.01,
         whitener: tuple[np.ndarray, float] | None = None) -> Plan:
    """Spectrum and rank of ``weight`` (K×N) under ``rule``; whitened by ``gram`` (XᵀX or
    :class:`Moments`, K×K) if given, or by a ``whitener`` from :func:`whitening` computed
    beforehand."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {w.shape}")
    if whitener is None and gram is not None:
        whitener = whitening(gram, damping)
    s, shrinkage = whitener if whitener is not None else (None, None)
    matrix = w if s is None else s @ w
    squares, svd = _spectrum(matrix)
    return Plan(matrix, tuple(w.shape), squares, rule.choose(squares), s, svd, shrinkage)


def low_rank_factors(weight: np.ndarray, rank: int, gram: np.ndarray | None = None,
                     damping: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """A (K×rank), B (rank×N) minimising ‖W − A·B‖ (or ‖X·W − X·A·B‖ with ``gram = XᵀX``)."""
    return plan(weight, RankRule(rank=rank), gram, damping).factors()


@dataclasses.dataclass
class Moments:
    """Second moments of a layer's input rows, streamed: Σ xxᵀ, the row count and Σ ‖x‖⁴
    (what the Ledoit–Wolf shrinkage needs besides the Gram matrix)."""

    gram: np.ndarray
    rows: int
    fourth: float

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.gram + other.gram, self.rows + other.rows, self.fourth + other.fourth)

    def shrinkage(self) -> float:
        """Ledoit–Wolf weight of the scaled identity in the covariance estimate, in [0, 1].

        With S = XᵀX/n and μ = tr(S)/K: α = min(β², δ²)/δ², δ² = ‖S − μI‖², β² = (Σ‖x‖⁴/n − ‖S‖²)/n
        (the non-centred form). Few rows for many inputs give α near 1: the data cannot tell
        the directions apart, and the fit moves towards the plain SVD instead of fitting the
        span of a handful of rows.
        """
        if self.rows == 0:
            return 1.0
        s = self.gram / self.rows
        mu = float(np.trace(s)) / len(s)
        s_norm2 = float(np.sum(s * s))
        delta2 = s_norm2 - 2 * mu * float(np.trace(s)) + mu * mu * len(s)
        if delta2 <= 1e-300:
            return 0.0
        beta2 = max(0.0, (self.fourth / self.rows - s_norm2) / self.rows)
        return float(min(beta2, delta2) / delta2)


def moments_of(rows: np.ndarray) -> Moments:
    x = np.asarray(rows, dtype=np.float64)
    norms = np.einsum("ij,ij->i", x, x)
    return Moments(x.T @ x, len(x), float(np.sum(norms * norms)))


def whitening(gram: np.ndarray | Moments, damping: float) -> tuple[np.ndarray, float]:
    """Upper-triangular S with SᵀS = C/c + damping·I, and the shrinkage used.

    ``gram`` is XᵀX (taken as the covariance C as it is) or :class:`Moments` (C is then the
    Ledoit–Wolf estimate ``(1−α)·XᵀX/n + α·μ·I``); c is the mean diagonal of C, so
    ``damping`` is relative to the mean variance.
    """
    alpha = 0.0
    if isinstance(gram, Moments):
        alpha = gram.shrinkage()
        g = gram.gram / max(gram.rows, 1)
        g = (1 - alpha) * g + alpha * (np.trace(g) / len(g)) * np.eye(len(g))
    else:
        g = np.asarray(gram, dtype=np.float64)
    g = (g + g.T) / 2
    mean_diag = float(np.mean(np.diag(g))) if g.size else 0.0
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0  # all-zero activations: only the ridge is left, i.e. plain SVD
        g = np.zeros_like(g)
    g = g / mean_diag  # scale-free: damping is relative to the mean variance
    lam = damping
    from scipy.linalg import cholesky

    with _lapack_threads(g.shape):
        for _ in range(8):
            try:
                return cholesky(g + lam * np.eye(len(g)), lower=False), alpha
            except np.linalg.LinAlgError:  # rounding made it indefinite: more ridge
                lam = max(lam * 10, 1e-10)
    raise np.linalg.LinAlgError("the activations' covariance is not positive definite")


def gram_of(rows: np.ndarray) -> np.ndarray:
    """XᵀX in float64 for a batch of rows (rows × K)."""
    x = np.asarray(rows, dtype=np.float64)
    return x.T @ x


def _spectrum(matrix: np.ndarray) -> tuple[np.ndarray, tuple | None]:
    if min(matrix.shape) < SMALL_SIDE:
        with _lapack_threads(matrix.shape):
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return s**2, (u, s, vt)
    small = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    with _lapack_threads(matrix.shape):
        values = np.linalg.eigvalsh(small)
    return np.clip(values[::-1], 0.0, None), None


def _randomized(shape: tuple[int, int], rank: int) -> bool:
    return min(shape) >= SMALL_SIDE and rank <= RANDOMIZED_SHARE * min(shape)


@contextlib.contextmanager
def _lapack_threads(shape):
    if min(shape) > SINGLE_THREAD_SIDE:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------- shared by the passes

DEFAULT_ENERGY = 0.95


@dataclasses.dataclass(frozen=True)
class LowRankOptions(PassOptions):
    """Options shared by low-rank-gemm and low-rank-conv (each pass subclasses it)."""

    exclusive = (("rank", "ratio", "energy"),)

    rank: int = option(0, "the same rank for every layer (0: not set); a layer whose full rank is "
                          "smaller is refused")
    ratio: float = option(0.0, "rank as a share of each layer's full rank min(K, N), in (0, 1], "
                               "rounded up (0: not set)")
    energy: float = option(DEFAULT_ENERGY, "smallest rank keeping this share of the squared singular "
                                           "values, in (0, 1]; used when neither rank nor ratio is set")
    data_aware: bool = option(False, "minimise the layer's output error on the calibration data "
                                     "(activation-whitened SVD) instead of the weight error")
    damping: float = option(0.01, "data_aware: ridge added to the activations' covariance, relative "
                                  "to its mean variance; larger values move towards plain SVD")
    min_elements: int = option(4096, "leave weights with fewer elements alone")
    exclude: str = option("", "regular expression: nodes whose name matches are left alone")

    def __post_init__(self):
        if self.rank < 0:
            self.fail("rank", f"must be a positive integer (0: not set), got {self.rank}")
        if not 0.0 <= self.ratio <= 1.0:
            self.fail("ratio", f"must lie in (0, 1] (0: not set), got {self.ratio}")
        if not 0.0 < self.energy <= 1.0:
            self.fail("energy", f"must lie in (0, 1], got {self.energy}")
        if self.rank and self.ratio:
            self.fail("ratio", "cannot be combined with rank: give one of rank, ratio, energy")
        if (self.rank or self.ratio) and self.energy != DEFAULT_ENERGY:
            other = "rank" if self.rank else "ratio"
            self.fail("energy", f"cannot be combined with {other}: give one of rank, ratio, energy")
        if not (self.damping > 0 and math.isfinite(self.damping)):
            self.fail("damping", f"must be a positive number, got {self.damping}")
        if self.min_elements < 0:
            self.fail("min_elements", f"must be 0 or more, got {self.min_elements}")
        self.check_pattern("exclude")

    @property
    def rule(self) -> RankRule:
        return RankRule(self.rank, self.ratio, self.energy)

    def excluded(self, node: ir.Node) -> bool:
        return bool(self.exclude) and re.search(self.exclude, node.name or "") is not None


def constant_reason(value: ir.Value | None, role: str = "weight") -> str:
    """Why ``value`` is not a constant floating-point initializer ('' when it is)."""
    if value is None:
        return f"it has no {role}"
    label = f"{role} '{value.name}'"
    if value.is_graph_input():
        return f"{label} is a graph input, not a constant"
    if value.const_value is None or not value.is_initializer():
        producer = value.producer()
        if producer is not None:
            return f"{label} is not constant (computed by {producer.op_type} '{node_label(producer)}')"
        return f"{label} is not a constant initializer"
    if value.is_graph_output():
        return f"{label} is also a graph output"
    if not value.const_value.dtype.is_floating_point():
        return f"{label} is {value.const_value.dtype.name}, not floating point"
    return ""


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant (initializer or Constant node), for ``candidates`` on raw models."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except Exception:  # noqa: BLE001 - anything odd is simply "not constant"
            tensor = None
    if tensor is None or not tensor.dtype.is_floating_point():
        return None
    return tensor.numpy()


def shared_reason(weight: ir.Value, sites: set[tuple[int, int]]) -> str:
    """Why a weight read by several nodes cannot be factorised once for all of them."""
    for use in weight.uses():
        if (id(use.node), use.idx) not in sites:
            return (f"weight '{weight.name}' is also read by '{node_label(use.node)}' "
                    f"({use.node.op_type}), which is not factorised with it")
    return ""


def shrink_reason(p: Plan, k_text: str = "K", n_text: str = "N") -> str:
    """The refusal when the chosen rank does not pay ('' when it does)."""
    k, n = p.weight_shape
    if p.rank == 0:
        return "the weight is all zero (rank 0): nothing to factorise"
    if p.rank > p.full_rank:
        return f"rank={p.rank} is more than the full rank min({k_text}, {n_text})=min({k}, {n})={p.full_rank}"
    if not p.shrinks:
        return (f"would not shrink: r({k_text}+{n_text})={p.rank}·({k}+{n})={p.params_after:,} ≥ "
                f"{k_text}·{n_text}={k}·{n}={p.params_before:,} at rank {p.rank} of {p.full_rank}"
                f"{_energy_text(p)}")
    return ""


def describe(p: Plan, data_aware: bool) -> str:
    """The report line of a factorisation."""
    saved = 1 - p.params_after / p.params_before
    kind = "data-aware, output energy on calibration data" if data_aware else "weight energy"
    shrunk = f", covariance shrinkage {p.shrinkage:.2f}" if p.shrinkage is not None else ""
    return (f"rank {p.rank} of {p.full_rank} ({kind} kept {p.energy:.4f}{shrunk}, {p.method()}): "
            f"{p.params_before:,} → {p.params_after:,} parameters (−{saved:.0%})")


def _energy_text(p: Plan) -> str:
    return f" (energy kept {p.energy:.4f})"


def collect_grams(model: ir.Model, requests: dict, feeds: list[dict], chunk_rows: int = 4096) -> dict:
    """``{key: Moments}`` (Σ XᵀX in float64, rows, Σ‖x‖⁴) over the calibration feeds.

    ``requests`` maps a key to ``(value name, rows_fn)``: ``rows_fn`` turns the value's array
    for one feed into the rows X (rows × K) that the layer multiplies by its weight. One
    onnxruntime session exposes every value; feeds run one at a time and rows are gathered
    into chunks of ``chunk_rows`` before each product, so memory stays at about one feed's
    activations plus one chunk per key.
    """
    from onnxcompress.runtime import make_session

    names = list(dict.fromkeys(name for name, _ in requests.values()))
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    session = make_session(model, optimize=False, extra_outputs=computed) if computed else None
    grams: dict = {}
    pending: dict = {key: [] for key in requests}

    def flush(key):
        if pending[key]:
            m = moments_of(np.concatenate(pending[key]))
            grams[key] = m if key not in grams else grams[key] + m
            pending[key] = []

    for feed in feeds:
        values = dict(zip(computed, session.run(computed, feed))) if session else {}
        values.update({n: feed[n] for n in names if n in inputs})
        for key, (name, rows_fn) in requests.items():
            pending[key].append(rows_fn(values[name]))
            if sum(len(rows) for rows in pending[key]) >= chunk_rows:
                flush(key)
    for key in requests:
        flush(key)
    return grams


class Whiteners:
    """Whitening factors by the set of activation keys they come from, computed once each
    (the query, key and value projections of a transformer share one input)."""

    def __init__(self, grams: dict, damping: float):
        self.grams, self.damping = grams, damping
        self._cache: dict = {}

    def __call__(self, keys) -> tuple[np.ndarray, float] | None:
        keys = tuple(dict.fromkeys(keys))
        if not self.grams or any(k not in self.grams for k in keys):
            return None
        if keys not in self._cache:
            total = self.grams[keys[0]]
            for key in keys[1:]:
                total = total + self.grams[key]
            self._cache[keys] = whitening(total, self.damping)
        return self._cache[keys]


def replace_node(node: ir.Node, first: ir.Node, second: ir.Node, hidden_name: str) -> None:
    """Put ``first`` → ``second`` where ``node`` was; ``second``'s output takes over the name,
    type, shape and every use of ``node``'s output (a graph output included)."""
    graph = node.graph
    old = node.outputs[0]
    new = second.outputs[0]
    hidden = first.outputs[0]
    hidden.name = hidden_name
    if old.type is not None:
        hidden.type = old.type  # same element type; the shape is left to shape inference
    graph.insert_before(node, [first, second])
    take_over(old, new)
    graph.remove(node, safe=True)
