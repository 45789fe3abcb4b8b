"""How important each prunable unit (class of coupled channels) is; higher = keep.

- ``l1`` / ``l2``: the mean absolute / root-mean-square weight of each source's output
  channel, summed over the sources a unit couples.
- ``apoz``: 1 − the share of zero activations (Hu et al. 2016) in the tensors the next
  layers read, on the calibration data.
- ``lasso``: He et al. 2017 channel selection: each unit's contribution to the outputs of
  the layers that read it, and the order in which a positive Lasso (scikit-learn's Lasso
  path, solved from the Gram matrix of the contributions) lets units in to reconstruct those
  outputs; units that enter late matter least.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import onnx_ir as ir
from scipy import sparse

from onnxcompress.activations import capture, stream
from onnxcompress.analysis.channels import ChannelGroups
from onnxcompress.reconstruct import refittable, sink_rows, weight_matrix

LASSO_ROWS = 4000  # sampled input rows of a k×k Conv sink (spread over the feeds)
LASSO_OUTPUTS = 16  # sampled output channels of a k×k Conv sink
EXACT_GRAM_LIMIT = 4096  # inputs up to which a Gemm/MatMul/1×1 sink's Gram is formed exactly
LASSO_ALPHAS = 40  # points of the Lasso path (log-spaced over three decades of α)


def importance_of_units(model: ir.Model, groups: ChannelGroups, method: str, feeds) -> dict[int, float]:
    if method in ("l1", "l2"):
        return _weight_norms(groups, method)
    if method == "apoz":
        return _apoz(model, groups, feeds)
    if method == "lasso":
        return _lasso(model, groups, feeds)
    raise ValueError(f"unknown importance {method!r}")


def _all_units(groups: ChannelGroups) -> list[int]:
    return [u for units in groups.groups for u in units]


def _weight_norms(groups: ChannelGroups, method: str) -> dict[int, float]:
    score: dict[int, float] = defaultdict(float)
    for source in groups.sources:
        weight = source.node.inputs[1].const_value.numpy().astype(np.float64)
        rows = np.moveaxis(weight, source.weight_axis, 0).reshape(weight.shape[source.weight_axis], -1)
        norms = np.abs(rows).mean(axis=1) if method == "l1" else np.sqrt((rows**2).mean(axis=1))
        for atom, norm in zip(source.atoms, norms):
            score[groups.unit(atom)] += float(norm)
    return {u: score[u] for u in _all_units(groups)}


def _sink_inputs(groups: ChannelGroups):
    """(sink node, its input tensor name, axis, atoms) for each sink slice."""
    out = []
    for item in groups.slices:
        if item.role == "sink":
            name = item.node.inputs[0].name
            axis, atoms = groups.tensors[name]
            out.append((item.node, name, axis, atoms))
    return out


def _apoz(model, groups, feeds) -> dict[int, float]:
    sinks = _sink_inputs(groups)
    acts = capture(model, [name for _, name, _, _ in sinks], feeds)
    zeros: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for _, name, axis, atoms in sinks:
        stacked = [np.moveaxis(a, axis, 0).reshape(len(atoms), -1) for a in acts[name]]
        share = np.mean(np.concatenate(stacked, axis=1) == 0, axis=1)
        for atom, s in zip(atoms, share):
            zeros[groups.unit(atom)] += float(s)
            count[groups.unit(atom)] += 1
    return {u: 1.0 - zeros[u] / count[u] if count[u] else 1.0 for u in _all_units(groups)}


def _lasso(model, groups, feeds) -> dict[int, float]:
    sinks = [s for s in _sink_inputs(groups) if refittable(s[0]) is None]
    fallback = _weight_norms(groups, "l1")
    tie_scale = 1e-6 / (1.0 + max(fallback.values(), default=0.0))
    result = dict(fallback)
    per_sink = _contribution_grams(groups, sinks, stream(model, [name for _, name, _, _ in sinks], feeds), len(feeds))
    for units in groups.groups:
        index = {u: i for i, u in enumerate(units)}
        gram = np.zeros((len(units), len(units)))
        touched = False
        for sink_units, sink_gram in per_sink:
            inside = [(i, index[u]) for i, u in enumerate(sink_units) if u in index]
            if inside:
                rows, cols = map(np.asarray, zip(*inside))
                gram[np.ix_(cols, cols)] += sink_gram[np.ix_(rows, rows)].astype(np.float64)
                touched = True
        if not touched:
            continue
        entered = lasso_entry_order(gram)
        for u, i in index.items():
            # Earlier entry = more important; l1 breaks ties among units that never entered.
            result[u] = entered[i] + tie_scale * fallback[u]
    return result


def _contribution_grams(groups: ChannelGroups, sinks, activations, feed_count: int):
    """Per sink: (the units its input carries, the Gram matrix of their contributions to its
    output over the calibration rows). Activations are read one feed at a time.

    A unit's contribution z_u is what its input channels add to the sink's output. For a
    Gemm/MatMul/1×1 Conv sink it is the outer product x_u·w_uᵀ, so ⟨z_u, z_v⟩ = (x_u·x_v)(w_u·w_v)
    exactly, over every row and every output: the Gram is (XᵀX) ∘ (WWᵀ). A k×k Conv sink has
    k² columns per channel; its contributions are formed on sampled rows and outputs.
    """
    rng = np.random.default_rng(0)
    rows_per_feed = max(1, -(-LASSO_ROWS // max(feed_count, 1)))
    states = []
    for node, _, _, atoms in sinks:
        weight = node.inputs[1].const_value.numpy()
        matrix = weight_matrix(node, weight).astype(np.float64)
        units = list(dict.fromkeys(groups.unit(a) for a in atoms))
        position = {u: i for i, u in enumerate(units)}
        # atoms -> units, one-hot (an atom repeats where a Flatten turned a channel into a block)
        assign = sparse.csr_matrix((np.ones(len(atoms)), (np.arange(len(atoms)), [position[groups.unit(a)] for a in atoms])),
                                   shape=(len(atoms), len(units)))
        width = matrix.shape[0] // len(atoms)  # kernel positions per input channel
        exact = width == 1 and len(atoms) <= EXACT_GRAM_LIMIT
        if not exact and matrix.shape[1] > LASSO_OUTPUTS:
            matrix = matrix[:, np.sort(rng.choice(matrix.shape[1], LASSO_OUTPUTS, replace=False))]
        states.append(_SinkGram(node, weight, matrix, units, assign, width, exact))
    for values in activations:
        for state, (_, name, _, _) in zip(states, sinks):
            state.add(sink_rows(state.node, values[name], state.weight), rng, rows_per_feed)
    return [(state.units, state.gram()) for state in states]


class _SinkGram:
    """Streams one sink's input rows into the Gram of its units' contributions."""

    FLUSH_ROWS = 512  # exact form: rows gathered per product (one feed may be a single row)

    def __init__(self, node, weight, matrix, units, assign, width, exact):
        self.node, self.weight, self.matrix, self.units = node, weight, matrix, units
        self.assign, self.width, self.exact = assign, width, exact
        # float32 throughout: a ranking needs no more, and minilm's six 1536² Grams stay 57 MB
        self.acc = np.zeros((assign.shape[0],) * 2 if exact else (len(units),) * 2, dtype=np.float32)
        self.pending: list[np.ndarray] = []
        self.one_to_one = assign.shape[0] == assign.shape[1]  # atom i is unit i: no projection

    def add(self, rows: np.ndarray, rng, sample: int) -> None:
        if self.exact:
            self.pending.append(rows.astype(np.float32, copy=False))
            if sum(len(r) for r in self.pending) >= self.FLUSH_ROWS:
                self._flush_into(self.acc)
            return
        rows = rows.astype(np.float32, copy=False)
        if rows.shape[0] > sample:
            rows = rows[rng.choice(rows.shape[0], sample, replace=False)]
        per_atom = rows.reshape(rows.shape[0], -1, self.width)
        matrix = self.matrix.reshape(per_atom.shape[1], self.width, -1)
        contrib = np.einsum("rap,apo->roa", per_atom, matrix).reshape(-1, per_atom.shape[1])
        contrib = (self.assign.T @ contrib.T).T
        self.acc += contrib.T @ contrib

    def _flush_into(self, acc: np.ndarray) -> None:
        if self.pending:
            rows = np.concatenate(self.pending)
            acc += rows.T @ rows
            self.pending = []

    def gram(self) -> np.ndarray:
        """The units' Gram; the accumulator is released (each sink's is read once)."""
        acc, self.acc = self.acc, None
        if self.exact:
            self._flush_into(acc)
            acc *= (self.matrix @ self.matrix.T).astype(np.float32)
            if not self.one_to_one:
                acc = np.asarray(self.assign.T @ (self.assign.T @ acc).T, dtype=np.float32)
        return acc


def lasso_entry_order(gram: np.ndarray) -> np.ndarray:
    """A score per unit, higher = enters the positive Lasso path earlier.

    With z_u a unit's contribution to the sinks' outputs and ẑ_u = z_u/‖z_u‖, the Lasso is
    ‖Σ_u z_u − Σ_u β_u ẑ_u‖² + α‖β‖₁ with β ≥ 0 (He et al. 2017): as α falls from its largest
    useful value, units enter in the order the output needs them. It is solved from the Gram
    matrix G_uv = ⟨z_u, z_v⟩ alone: any R with RᵀR = Ĝ (the normalised Gram) gives the same
    problem with R as the design matrix and R·‖z‖ as the target, so the rows and outputs
    behind G are never held. The score is minus the step of the path (LASSO_ALPHAS log-spaced
    α) at which a unit first enters, plus its share of the largest coefficient at that step to
    order units entering together; units that never enter score -LASSO_ALPHAS.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lasso_path

    scale = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scale[scale == 0] = 1.0
    normalised = gram / np.outer(scale, scale)
    root = _gram_root(normalised)
    correlation = normalised @ scale
    # scikit-learn's own grid: from the α at which the first unit enters down three decades
    # (its objective divides the squared error by the number of rows, here len(root))
    alphas = max(float(correlation.max()), 1e-30) / len(root) * np.logspace(0, -3, LASSO_ALPHAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the order of entry is all we read
        _, path, _ = lasso_path(root, root @ scale, alphas=alphas, positive=True, precompute=normalised,
                                Xy=correlation, tol=1e-3, max_iter=200)
    active = path > 0
    first = np.where(active.any(axis=1), active.argmax(axis=1), path.shape[1])
    at_entry = np.where(first < path.shape[1], path[np.arange(len(first)), np.minimum(first, path.shape[1] - 1)], 0.0)
    return -first + 0.5 * at_entry / max(float(at_entry.max()), 1e-30)


def _gram_root(gram: np.ndarray) -> np.ndarray:
    """R with RᵀR = gram (up to 1e-9 on the unit diagonal): Cholesky, or eigenvectors when
    the Gram is too singular for it."""
    try:
        return np.linalg.cholesky(gram + 1e-9 * np.eye(len(gram))).T
    except np.linalg.LinAlgError:
        eigenvalues, vectors = np.linalg.eigh(gram)
        return np.sqrt(np.clip(eigenvalues, 0.0, None))[:, None] * vectors.T
