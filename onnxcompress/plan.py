"""Plan files: a pipeline with per-node options, as JSON, for tools to write and people to edit.

    {"format": "onnxcompress-plan", "version": 1,
     "pipeline": [
       {"pass": "default"},
       {"pass": "low-rank-gemm", "options": {"energy": 0.9},
        "nodes": [{"match": "/encoder/layer\\\\.0/.*", "options": {"rank": 32}},
                  {"match": ".*", "skip": true}]}]}

Each step is a pass (or a preset) with its options and, in order, its per-node overrides:
``match`` is a regular expression on the whole node name, the first match wins. A pipeline
string names a plan file as an entry, ``@FILE`` (``-p @tuned.plan.json`` or
``default,@ranks.json``), which expands in place. The file and its pipeline string say the
same thing: :func:`plan_to_text` and :func:`pipeline_to_plan` convert between them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnxcompress.errors import PipelineError

FORMAT = "onnxcompress-plan"
VERSION = 1


def read_plan_text(path: str | os.PathLike) -> str:
    """The pipeline string of the plan file at ``path``."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read plan file '{path}': {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"plan file '{path}' is not JSON: {exc}") from None
    return plan_to_text(data, str(path))


def plan_to_text(data: Any, where: str = "plan") -> str:
    """The pipeline string a plan (the parsed JSON) stands for."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PipelineError(f"{where}: not an onnxcompress plan (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise PipelineError(f"{where}: plan version {data.get('version')!r} is not supported (this version reads {VERSION})")
    steps = data.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise PipelineError(f"{where}: \"pipeline\" must be a non-empty list of steps")
    return ",".join(_step_text(step, f"{where}: step {i + 1}") for i, step in enumerate(steps))


def _step_text(step: Any, where: str) -> str:
    from onnxcompress.pipeline import format_value

    if not isinstance(step, dict) or not isinstance(step.get("pass"), str):
        raise PipelineError(f"{where}: a step is an object with a \"pass\" name")
    unknown = set(step) - {"pass", "options", "nodes"}
    if unknown:
        raise PipelineError(f"{where}: unknown key {sorted(unknown)[0]!r} (a step has pass, options, nodes)")
    parts = [f"{k}={format_value(_text(v, where))}" for k, v in _object(step.get("options", {}), f"{where} options").items()]
    nodes = step.get("nodes", [])
    if not isinstance(nodes, list):
        raise PipelineError(f"{where}: \"nodes\" must be a list of {{\"match\": ..., \"options\"|\"skip\": ...}}")
    for node in nodes:
        if not isinstance(node, dict) or not isinstance(node.get("match"), str):
            raise PipelineError(f"{where}: each entry of \"nodes\" needs a \"match\" pattern")
        values = {k: _text(v, where) for k, v in _object(node.get("options", {}), f"{where} nodes").items()}
        if "skip" in node:
            values["skip"] = _text(node["skip"], where)
        inner = ",".join(f"{k}={format_value(v)}" for k, v in values.items())
        parts.append(f"@{format_value(node['match'])}{{{inner}}}")
    return step["pass"] + ("{" + ",".join(parts) + "}" if parts else "")


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise PipelineError(f"{where}: expected an object of option names to values")
    return value


def _text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) else repr(value)
    raise PipelineError(f"{where}: option values are strings, numbers or booleans, got {value!r}")


def pipeline_to_plan(pipeline, **metadata: Any) -> dict:
    """The plan (JSON-ready) of a parsed :class:`~onnxcompress.pipeline.Pipeline`; extra
    keyword arguments are kept under ``"about"`` (what made the plan, its measurements)."""
    from onnxcompress.options import non_default_items

    steps = []
    for entry in pipeline:
        step: dict[str, Any] = {"pass": entry.name}
        options = dict(non_default_items(entry.options))
        if options:
            step["options"] = options
        if entry.overrides:
            step["nodes"] = [
                {"match": o.pattern, "skip": True} if o.skip else {"match": o.pattern, "options": dict(o.items)}
                for o in entry.overrides
            ]
        steps.append(step)
    plan: dict[str, Any] = {"format": FORMAT, "version": VERSION, "pipeline": steps}
    if metadata:
        plan["about"] = metadata
    return plan


def write_plan(pipeline, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write the plan file of ``pipeline`` atomically."""
    from onnxcompress.modelio import write_atomically

    text = json.dumps(pipeline_to_plan(pipeline, **metadata), indent=2) + "\n"
    return write_atomically(Path(path), text.encode())
