"""Progress bars: every item passes through; a bar only on a terminal, nothing otherwise."""

from __future__ import annotations

import io
import sys

import pytest

from onnxcompress.progress import Progress, StageBars, progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_silent_and_complete_when_stderr_is_captured(capsys):
    items = [{"x": i} for i in range(7)]
    assert list(progress(items, desc="calibrating")) == items
    assert not sys.stderr.isatty()
    assert capsys.readouterr() == ("", "")


def test_silent_on_a_stream_that_is_not_a_terminal():
    stream = io.StringIO()
    seen = list(Progress(iter(range(5)), desc="search", stream=stream))
    assert seen == [0, 1, 2, 3, 4]
    assert stream.getvalue() == ""


def test_silent_on_a_closed_stream():
    stream = io.StringIO()
    stream.close()
    assert list(Progress(range(3), stream=stream)) == [0, 1, 2]


def test_counting_by_hand_is_silent_off_a_terminal():
    stream = io.StringIO()
    with Progress(total=10, desc="calibrating", stream=stream) as bar:
        for _ in range(4):
            bar.update(2)
    assert bar.n == 8
    assert stream.getvalue() == ""


def test_on_a_terminal_the_bar_ends_full_on_its_own_line():
    stream = Terminal()
    assert list(Progress(range(3), desc="calibrating", stream=stream)) == [0, 1, 2]
    out = stream.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1
    last = out.rstrip("\n").split("\r")[-1]
    assert last.startswith("calibrating: [") and " 3/3 100% " in last and "." not in last.split("]")[0]


def test_closing_twice_draws_once():
    stream = Terminal()
    bar = Progress(total=2, stream=stream)
    bar.update(2)
    bar.close()
    bar.close()
    assert stream.getvalue().count("\n") == 1


def test_bar_is_filled_in_proportion_and_fits_the_width():
    bar = Progress(total=4, desc="d", stream=io.StringIO())
    bar.update(2)
    line = bar.line(60)
    assert len(line) <= 60
    cells = line[line.index("[") + 1 : line.index("]")]
    assert cells.count("#") == len(cells) // 2 and set(cells) == {"#", "."}
    assert len(bar.line(10)) == 10


def test_without_a_total_the_bar_counts():
    bar = Progress((i for i in range(3)), desc="search", stream=io.StringIO())
    assert bar.total is None
    assert list(bar) == [0, 1, 2]
    assert bar.line(80).startswith("search: 3 in ")


def test_total_comes_from_the_length():
    assert Progress([1, 2, 3], stream=io.StringIO()).total == 3
    assert Progress([1, 2, 3], total=10, stream=io.StringIO()).total == 10


def test_iterating_a_bar_without_items_is_an_error():
    with pytest.raises(TypeError, match="no iterable"):
        list(Progress(total=3, stream=io.StringIO()))


def test_a_loop_that_breaks_closes_the_bar():
    stream = Terminal()
    for item in Progress(range(10), stream=stream):
        if item == 2:
            break
    assert stream.getvalue().endswith("\n")


def test_stage_bars_draw_one_line_per_stage_on_a_terminal():
    stream = Terminal()
    with StageBars(stream) as report:
        for done in range(1, 5):
            report("sensitivity", done, 4)
        for k in (6, 3, 5, 4):  # a bisection moves back and forth
            report("search", k, 6)
    lines = stream.getvalue().split("\n")
    assert len(lines) == 3 and lines[2] == ""
    assert lines[0].split("\r")[-1].startswith("sensitivity: [") and " 4/4 100% " in lines[0]
    assert lines[1].split("\r")[-1].startswith("search: [") and " 4/6  67% " in lines[1]


def test_stage_bars_are_silent_off_a_terminal(capsys):
    stream = io.StringIO()
    with StageBars(stream) as report:
        report("sensitivity", 1, 2)
        report("search", 2, 2)
    with StageBars() as report:  # stderr, captured here
        report("sensitivity", 1, 1)
    assert stream.getvalue() == "" and capsys.readouterr() == ("", "")
