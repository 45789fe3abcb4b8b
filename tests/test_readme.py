"""The README's generated tables match the registry, and its commands are the real ones."""

from pathlib import Path

from onnxcompress.docs import render
from onnxcompress.pipeline import Pipeline

README = Path(__file__).resolve().parent.parent / "README.md"


def test_generated_tables_are_current():
    text = README.read_text()
    assert render(text) == text, "run: python -m onnxcompress.docs README.md"


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in README.read_text()
    assert "\npython -m pytest\n" in ci


def test_print_pipeline_example_is_true():
    assert str(Pipeline.parse("prune-channels{ratio=0.30}")) == "lift-constants,fold-batchnorm,infer-shapes,prune-channels"


def test_per_node_examples_parse_and_print_back():
    text = README.read_text()
    block = text.split("**Per-node options.**", 1)[1].split("```", 2)[1]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(lines) == 3
    for line in lines:
        entry = [e for e in Pipeline.parse(line)][-1]
        assert entry.overrides, line
        printed = str(Pipeline.parse(line))
        assert str(Pipeline.parse(printed)) == printed
