"""How important each prunable unit (class of coupled channels) is; higher = keep.

- ``l1`` / ``l2``: the mean absolute / root-mean-square weight of each source's output
  channel, summed over the sources a unit couples.
- ``apoz``: 1 − the share of zero activations (Hu et al. 2016) in the tensors the next
  layers read, on the calibration data.
- ``lasso``: He et al. 2017 channel selection: each unit's contribution to the outputs of
  the layers that read it, and the order in which a positive Lasso (scikit-learn's LARS
  path) lets units in to reconstruct those outputs; units that enter late matter least.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxcompress.activations import capture
from onnxcompress.analysis.channels import ChannelGroups
from onnxcompress.reconstruct import refittable, sink_rows, weight_matrix

LASSO_ROWS = 1000  # sampled input rows per sink
LASSO_OUTPUTS = 16  # sampled output channels per sink


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
    from sklearn.linear_model import lars_path_gram

    sinks = [s for s in _sink_inputs(groups) if refittable(s[0]) is None]
    acts = capture(model, [name for _, name, _, _ in sinks], feeds)
    fallback = _weight_norms(groups, "l1")
    result = dict(fallback)
    rng = np.random.default_rng(0)
    for units in groups.groups:
        index = {u: i for i, u in enumerate(units)}
        blocks = []
        for node, name, axis, atoms in sinks:
            if not any(groups.unit(a) in index for a in atoms):
                continue
            weight = node.inputs[1].const_value.numpy()
            rows = np.concatenate([sink_rows(node, x, weight) for x in acts[name]])
            if rows.shape[0] > LASSO_ROWS:
                rows = rows[rng.choice(rows.shape[0], LASSO_ROWS, replace=False)]
            matrix = weight_matrix(node, weight)
            if matrix.shape[1] > LASSO_OUTPUTS:
                matrix = matrix[:, np.sort(rng.choice(matrix.shape[1], LASSO_OUTPUTS, replace=False))]
            per_position = len(atoms)
            width = rows.shape[1] // per_position  # kernel positions per input channel
            contrib = np.zeros((rows.shape[0] * matrix.shape[1], len(units)))
            for pos, atom in enumerate(atoms):
                unit = groups.unit(atom)
                if unit not in index:
                    continue
                cols = slice(pos * width, (pos + 1) * width)
                contrib[:, index[unit]] += (rows[:, cols] @ matrix[cols]).ravel()
            blocks.append(contrib)
        if not blocks:
            continue
        z = np.concatenate(blocks)
        y = z.sum(axis=1)
        scale = np.linalg.norm(z, axis=0)
        scale[scale == 0] = 1.0
        # LARS on the Gram matrix: each step costs O(units²) instead of O(rows·units). One step
        # per unit is enough to order them; units that never enter rank last.
        zs = z / scale
        _, _, coefs = lars_path_gram(zs.T @ y, zs.T @ zs, n_samples=zs.shape[0], method="lasso", positive=True,
                                     max_iter=len(units))
        entered = np.full(len(units), coefs.shape[1], dtype=float)
        for i in range(len(units)):
            steps = np.nonzero(coefs[i])[0]
            if steps.size:
                entered[i] = steps[0]
        for u, i in index.items():
            # Earlier entry = more important; l1 breaks ties among units that never entered.
            result[u] = -entered[i] + 1e-6 * fallback[u] / (1.0 + max(fallback.values()))
    return result
