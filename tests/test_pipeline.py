"""Pipeline grammar, option parsing and printing, presets, ordering by prerequisites."""

from __future__ import annotations

import dataclasses

import pytest

from onnxcompress.errors import OptionError, OrderingError, PipelineError
from onnxcompress.options import PassOptions, option
from onnxcompress.pipeline import Pipeline
from onnxcompress.registry import PRESETS
from typing import Literal


@dataclasses.dataclass(frozen=True)
class FakeOptions(PassOptions):
    ratio: float = option(0.5, "a ratio")
    mode: Literal["l1", "l2"] = option("l1", "a choice")
    count: int = option(3, "an int")
    flag: bool = option(False, "a flag")
    pattern: str = option("", "a string")

    def __post_init__(self):
        if not 0 <= self.ratio <= 1:
            self.fail("ratio", f"must lie in [0, 1], got {self.ratio}")


def fake(name, requires=(), options=FakeOptions):
    opts = type(f"{name}Options", (options,), {})
    opts = dataclasses.dataclass(frozen=True)(opts)
    opts.pass_name = name
    return type(name, (), {"name": name, "prerequisites": tuple(requires), "Options": opts})


def lookup_of(*classes):
    table = {c.name: c for c in classes}

    def lookup(name):
        if name not in table:
            raise PipelineError(f"unknown pass '{name}'")
        return table[name]

    return lookup


LOOKUP = lookup_of(fake("a"), fake("b"), fake("c"), fake("d", requires=("a",)), fake("e", requires=("d",)))


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "a,b,c",
        "a{ratio=0.3},b",
        "a{ratio=0.25,mode=l2,count=7,flag=true},c",
        "b{pattern=conv1|fc.*}",
        'b{pattern="a,b{c}=\\"q\\""}',
    ],
)
def test_canonical_text_prints_back_exactly(text):
    pipeline = Pipeline.parse(text, LOOKUP)
    assert str(pipeline) == text
    assert Pipeline.parse(str(pipeline), LOOKUP) == pipeline


def test_printing_normalises_whitespace_defaults_and_numbers():
    pipeline = Pipeline.parse(" a { ratio = .30 , mode=l1 } , b{flag=yes}", LOOKUP)
    assert str(pipeline) == "a{ratio=0.3},b{flag=true}"
    assert str(Pipeline.parse(str(pipeline), LOOKUP)) == str(pipeline)


def test_quoted_value_round_trip_keeps_special_characters():
    pipeline = Pipeline.parse('b{pattern="x, y{z}"}', LOOKUP)
    assert pipeline.entries[0].options.pattern == "x, y{z}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pipeline"),
        ("a,", "column 3: expected a pass name"),
        ("a{ratio}", "expected '='"),
        ("a{ratio=0.3", "expected '}'"),
        ("a{ratio=0.1,ratio=0.2}", "given twice"),
        ("a b", "unexpected 'b'"),
        ('b{pattern="open}', "unterminated"),
        ("zz", "unknown pass 'zz'"),
    ],
)
def test_malformed_pipelines_name_the_problem(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text, LOOKUP)


@pytest.mark.parametrize(
    "text, message",
    [
        ("a{nope=1}", "a: unknown option 'nope'; known options: ratio"),
        ("a{ratio=abc}", "option 'ratio' must be a number"),
        ("a{count=1.5}", "option 'count' must be an integer"),
        ("a{mode=l3}", "option 'mode' must be one of l1|l2"),
        ("a{flag=maybe}", "option 'flag' must be true or false"),
        ("a{ratio=2}", r"option 'ratio' must lie in \[0, 1\]"),
    ],
)
def test_bad_options_are_one_clear_error(text, message):
    with pytest.raises(OptionError, match=message):
        Pipeline.parse(text, LOOKUP)


def test_missing_prerequisite_is_inserted_before_first_user():
    assert str(Pipeline.parse("b,d,c", LOOKUP)) == "b,a,d,c"


def test_transitive_prerequisites_are_inserted_in_order():
    assert str(Pipeline.parse("b,e", LOOKUP)) == "b,a,d,e"


def test_existing_prerequisite_is_reused_and_user_order_stands():
    assert str(Pipeline.parse("a{ratio=0.1},b,d", LOOKUP)) == "a{ratio=0.1},b,d"


def test_prerequisite_given_later_is_moved_before_its_user():
    assert str(Pipeline.parse("d,b,a{ratio=0.2}", LOOKUP)) == "a{ratio=0.2},d,b"


def test_ordering_is_stable_when_nothing_is_required():
    assert str(Pipeline.parse("c,b,a,c", LOOKUP)) == "c,b,a,c"


def test_prerequisite_cycle_is_reported_with_the_cycle():
    lookup = lookup_of(fake("x", requires=("y",)), fake("y", requires=("z",)), fake("z", requires=("x",)))
    with pytest.raises(OrderingError, match=r"cycle: (\w) -> (\w) -> (\w) -> \1"):
        Pipeline.parse("x", lookup)


def test_presets_expand_and_parse_back_to_themselves():
    for name, (text, _) in PRESETS.items():
        pipeline = Pipeline.parse(name)
        assert str(Pipeline.parse(str(pipeline))) == str(pipeline)
        assert [e.name for e in pipeline][: len(text.split(","))]  # non-empty


def test_default_preset_is_the_lossless_normalisation():
    pipeline = Pipeline.parse("default")
    from onnxcompress.registry import get_pass

    assert all(get_pass(e.name).lossless for e in pipeline)
    assert {"lift-constants", "fold-constants", "fold-batchnorm", "cleanup"} <= {e.name for e in pipeline}


def test_preset_takes_no_options():
    with pytest.raises(PipelineError, match="preset 'default' takes no options"):
        Pipeline.parse("default{x=1}")


def test_registered_options_parse_back(tmp_path):
    pipeline = Pipeline.parse("cleanup{deduplicate=false}")
    assert str(pipeline) == "cleanup{deduplicate=false}"
    assert pipeline.entries[0].options.deduplicate is False
