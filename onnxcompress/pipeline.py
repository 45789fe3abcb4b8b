"""Pipeline strings: the one way to say what to run, and how it is ordered.

Grammar (whitespace between tokens is ignored)::

    pipeline := entry ("," entry)*
    entry    := NAME ["{" item ("," item)* "}"]  |  "@" VALUE
    item     := KEY "=" VALUE  |  "@" VALUE "{" [option ("," option)*] "}"
    option   := KEY "=" VALUE
    VALUE    := bare text without , { } = " or whitespace  |  "quoted text with \\" and \\\\"

A NAME is a pass or a preset (presets expand in place and take no options). ``@FILE`` as an
entry expands in place to the pipeline of a JSON plan file (:mod:`onnxcompress.plan`).
``@PATTERN{...}`` inside a pass's braces is a per-node override: the nodes whose whole name
matches the regular expression PATTERN take those options (``skip=true``: are left alone);
the first matching override wins, in the order written. A parsed pipeline prints back as
canonical text: presets and plan files expanded, default-valued options dropped, values
normalised; that text parses to the same pipeline and prints to itself.

Ordering: each pass declares the passes that must run before it (``prerequisites``). Missing
prerequisites are inserted just before the first pass that needs them; otherwise the
user's order stands. The order is a lexicographic topological sort of a networkx DAG
keyed by position; a cycle among prerequisites is an error that names the cycle.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import networkx as nx

from onnxcompress import registry
from onnxcompress.errors import OrderingError, PipelineError
from onnxcompress.options import NodeOverride, PassOptions, non_default_items, parse_options, parse_override

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_VALUE = re.compile(r'[^,{}="\s]+')


@dataclasses.dataclass(frozen=True)
class PipelineEntry:
    """One pass with its options."""

    name: str
    options: PassOptions
    overrides: tuple[NodeOverride, ...] = ()

    def __str__(self) -> str:
        return format_entry(self.name, non_default_items(self.options), self.overrides)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    entries: tuple[PipelineEntry, ...]

    def __str__(self) -> str:
        return ",".join(str(e) for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    @classmethod
    def parse(cls, text: str, lookup: Callable[[str], type] | None = None) -> "Pipeline":
        """Parse, expand presets, validate options and order by prerequisites."""
        lookup = lookup or registry.get_pass
        raw = _expand_presets(_Parser(text).parse_pipeline(), lookup)
        entries = [_build_entry(lookup(name), name, opts, overrides) for name, opts, overrides in raw]
        return cls(tuple(order_entries(entries, lookup)))


def _build_entry(pass_cls, name: str, opts: dict[str, str], overrides: list) -> PipelineEntry:
    options = parse_options(pass_cls.Options, opts)
    allowed = getattr(pass_cls, "per_node", None)
    built = tuple(parse_override(options, pattern, values, allowed) for pattern, values in overrides)
    return PipelineEntry(name, options, built)


def format_value(text: str) -> str:
    if text and _BARE_VALUE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_entry(name: str, items: list[tuple[str, str]], overrides=()) -> str:
    parts = [f"{k}={format_value(v)}" for k, v in items]
    parts += [format_override(o) for o in overrides]
    return name + "{" + ",".join(parts) + "}" if parts else name


def format_override(override: NodeOverride) -> str:
    inner = ",".join(f"{k}={format_value(v)}" for k, v in override.items)
    return f"@{format_value(override.pattern)}{{{inner}}}"


_REGEX_SPECIAL = re.compile(r"([\\.^$*+?{}\[\]|()])")


def name_pattern(name: str) -> str:
    """A pattern that matches exactly the node ``name`` (only regex metacharacters escaped)."""
    return _REGEX_SPECIAL.sub(r"\\\1", name)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> PipelineError:
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        return PipelineError(f"bad pipeline at column {self.pos + 1}: {what} in '{shown}'")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = f"'{self.peek()}'" if self.peek() else "end of text"
            raise self.fail(f"expected '{char}', found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern, what: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if not m:
            found = f"'{self.peek()}'" if self.peek() else "end of text"
            raise self.fail(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def parse_pipeline(self) -> list[tuple[str, dict[str, str], list]]:
        if not self.text.strip():
            raise PipelineError("empty pipeline: name at least one pass or preset")
        entries = [self.parse_entry()]
        while self.peek() == ",":
            self.pos += 1
            entries.append(self.parse_entry())
        if self.peek():
            raise self.fail(f"unexpected '{self.peek()}'")
        return entries

    def parse_entry(self) -> tuple[str, dict[str, str], list]:
        if self.peek() == "@":
            self.pos += 1
            return PLAN_FILE, {"path": self.parse_value()}, []
        name = self.match(_NAME, "a pass name")
        options: dict[str, str] = {}
        overrides: list[tuple[str, dict[str, str]]] = []
        if self.peek() == "{":
            self.pos += 1
            while True:
                if self.peek() == "@":
                    self.pos += 1
                    pattern = self.parse_value()
                    self.expect("{")
                    overrides.append((pattern, self.parse_options(f"'{name}' @{pattern}", allow_empty=True)))
                else:
                    if overrides:
                        raise self.fail(f"options of '{name}' come before its per-node overrides")
                    self.parse_option(options, f"'{name}'")
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                break
        return name, options, overrides

    def parse_options(self, where: str, allow_empty: bool) -> dict[str, str]:
        """``option ("," option)* "}"`` after an opening brace."""
        options: dict[str, str] = {}
        if allow_empty and self.peek() == "}":
            self.pos += 1
            return options
        while True:
            self.parse_option(options, where)
            if self.peek() != ",":
                self.expect("}")
                return options
            self.pos += 1

    def parse_option(self, options: dict[str, str], where: str) -> None:
        key = self.match(_NAME, "an option name")
        self.expect("=")
        if key in options:
            raise self.fail(f"option '{key}' given twice for {where}")
        options[key] = self.parse_value()

    def parse_value(self) -> str:
        if self.peek() != '"':
            return self.match(_BARE_VALUE, "a value")
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if char == '"':
                self.pos += 1
                return "".join(out)
            out.append(char)
            self.pos += 1
        raise self.fail("unterminated quoted value")


PLAN_FILE = "@"  # the entry name the parser gives an ``@FILE`` entry


def _expand_presets(raw, lookup, seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, str], list]]:
    expanded = []
    for name, options, overrides in raw:
        if name == PLAN_FILE:
            expanded.extend(_expand_plan_file(options["path"], lookup, seen))
        elif name in registry.PRESETS and not _is_pass(name, lookup):
            if options or overrides:
                raise PipelineError(f"preset '{name}' takes no options; give options to its passes")
            expanded.extend(_Parser(registry.PRESETS[name][0]).parse_pipeline())
        else:
            lookup(name)  # unknown names fail here, with the message of the lookup
            expanded.append((name, options, overrides))
    return expanded


def _expand_plan_file(path: str, lookup, seen: tuple[str, ...]):
    from onnxcompress.plan import read_plan_text

    if path in seen:
        raise PipelineError(f"plan file '{path}' includes itself: {' -> '.join((*seen, path))}")
    return _expand_presets(_Parser(read_plan_text(path)).parse_pipeline(), lookup, (*seen, path))


def _is_pass(name: str, lookup) -> bool:
    try:
        lookup(name)
        return True
    except PipelineError:
        return False


def order_entries(entries: list[PipelineEntry], lookup: Callable[[str], type]) -> list[PipelineEntry]:
    """Insert missing prerequisites and order by them, keeping the user's order otherwise."""
    graph = nx.DiGraph()
    position: dict[int, float] = {}
    items: dict[int, PipelineEntry] = {}
    for i, entry in enumerate(entries):
        items[i] = entry
        position[i] = float(i)
        graph.add_node(i)

    _check_requirement_cycles({e.name for e in entries}, lookup)
    pending = list(items)
    while pending:
        node = pending.pop(0)
        for required in lookup(items[node].name).prerequisites:
            source = _find_provider(items, position, required, position[node])
            if source is None:
                source = len(items)
                items[source] = PipelineEntry(required, lookup(required).Options())
                position[source] = _just_before(position, position[node])
                graph.add_node(source)
                pending.append(source)
            elif position[source] > position[node]:
                # A prerequisite the user wrote too late moves to just before its first user.
                position[source] = _just_before(position, position[node])
            graph.add_edge(source, node)
    order = nx.lexicographical_topological_sort(graph, key=lambda n: position[n])
    return [items[n] for n in order]


def _just_before(position: dict[int, float], p: float) -> float:
    """A position between ``p`` and the nearest position below it."""
    lower = max((q for q in position.values() if q < p), default=p - 1.0)
    return (lower + p) / 2.0


def _find_provider(items, position, name, before: float):
    """The nearest earlier entry named ``name``, else the first later one, else None."""
    earlier = [n for n, e in items.items() if e.name == name and position[n] < before]
    if earlier:
        return max(earlier, key=lambda n: position[n])
    later = [n for n, e in items.items() if e.name == name and position[n] > before]
    return min(later, key=lambda n: position[n]) if later else None


def _check_requirement_cycles(names: set[str], lookup) -> None:
    """Fail with the cycle if the declared prerequisites reachable from ``names`` loop."""
    graph = nx.DiGraph()
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        graph.add_node(name)
        for required in lookup(name).prerequisites:
            graph.add_edge(required, name)
            todo.append(required)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    path = [a for a, _ in cycle] + [cycle[0][0]]
    raise OrderingError("pass prerequisites form a cycle: " + " -> ".join(path))
