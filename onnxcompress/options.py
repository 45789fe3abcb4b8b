"""Pass options: frozen dataclasses that parse from and print to pipeline text.

Every field has a default and a help text (``field(default=..., metadata={"help": ...})``
via :func:`option`). Values are validated in ``__post_init__`` of the subclass.
``format_options`` prints only the fields that differ from their defaults, in
declaration order, so that ``parse(format(x)) == x`` and printing is canonical.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

from onnxcompress.errors import OptionError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default value and a help text."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base class of every pass's ``Options``. Has no fields itself."""

    pass_name: ClassVar[str] = "?"
    # Groups of options of which a user gives one (e.g. rank, ratio, energy): a per-node
    # override that sets one resets the others of its group to their defaults.
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def fail(self, option_name: str, message: str) -> typing.NoReturn:
        raise OptionError(f"{self.pass_name}: option '{option_name}' {message}")

    def check_pattern(self, option_name: str) -> None:
        """Fail unless the option holds a valid regular expression (an empty one is unset)."""
        pattern = getattr(self, option_name)
        if pattern:
            try:
                re.compile(pattern)
            except re.error as exc:
                self.fail(option_name, f"is not a valid regular expression: {exc}")


def _field_types(cls: type[PassOptions]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(pass_name: str, name: str, text: str, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if text not in choices:
            raise OptionError(
                f"{pass_name}: option '{name}' must be one of {'|'.join(choices)}, got '{text}'"
            )
        return text
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if text in ("none", "None", ""):
            return None
        return _convert(pass_name, name, text, args[0])
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            value = float(text)
            if value != value:  # NaN
                raise ValueError
            return value
        if annotation is str:
            return text
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[annotation]
        raise OptionError(f"{pass_name}: option '{name}' must be {kind}, got '{text}'") from None
    raise TypeError(f"unsupported option type {annotation!r} for {pass_name}.{name}")


def parse_options(cls: type[PassOptions], values: dict[str, str]) -> PassOptions:
    """Build ``cls`` from option text; unknown names and bad values raise OptionError."""
    types = _field_types(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, text in values.items():
        if name not in types or name not in known:
            hint = f"; known options: {', '.join(known)}" if known else "; it takes no options"
            raise OptionError(f"{cls.pass_name}: unknown option '{name}'{hint}")
        kwargs[name] = _convert(cls.pass_name, name, text, types[name])
    return cls(**kwargs)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def non_default_items(opts: PassOptions) -> list[tuple[str, str]]:
    items = []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if value != f.default:
            items.append((f.name, format_value(value)))
    return items


SKIP_OPTION = "skip"


@dataclasses.dataclass(frozen=True)
class NodeOverride:
    """Options for the nodes whose name matches ``pattern`` (a regular expression that must
    match the whole name), or ``options=None``: leave those nodes alone (``skip=true``).

    ``items`` is the override as written, in canonical form (declaration order, values
    normalised), so that it prints back exactly.
    """

    pattern: str
    options: PassOptions | None
    items: tuple[tuple[str, str], ...]

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    @property
    def skip(self) -> bool:
        return self.options is None


def parse_override(base: PassOptions, pattern: str, values: dict[str, str], allowed: tuple[str, ...] | None) -> NodeOverride:
    """The per-node override ``@pattern{values}`` of a pass whose options are ``base``.

    ``allowed`` names the options a pass lets a node override (None: the pass takes no
    per-node options at all). ``skip=true`` leaves the matching nodes alone and takes no
    other option. Setting one option of an exclusive group (``Options.exclusive``, e.g.
    rank/ratio/energy) resets the others of that group to their defaults for those nodes.
    """
    cls = type(base)
    name = cls.pass_name
    if allowed is None:
        raise OptionError(f"{name}: takes no per-node options (@{pattern}{{...}})")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise OptionError(f"{name}: node pattern '{pattern}' is not a valid regular expression: {exc}") from None
    values = dict(values)
    skip_text = values.pop(SKIP_OPTION, None)
    if skip_text is not None:
        skip = _convert(name, SKIP_OPTION, skip_text, bool)
        if values and skip:
            raise OptionError(f"{name}: @{pattern}: skip=true takes no other option, got {', '.join(values)}")
        if skip:
            return NodeOverride(pattern, None, (("skip", "true"),))
    for key in values:
        if key not in allowed:
            where = f"per node it takes {', '.join(allowed)} or skip" if allowed else "per node it only takes skip"
            raise OptionError(f"{name}: option '{key}' cannot be set per node (@{pattern}); {where}")
    given = parse_options(cls, values) if values else cls()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for key in values:
        for group in getattr(cls, "exclusive", ()):
            if key in group:
                for other in group:
                    fields[other] = _default(cls, other)
    for key in values:
        fields[key] = getattr(given, key)
    options = cls(**fields)
    order = [f.name for f in dataclasses.fields(cls)]
    items = tuple((k, format_value(getattr(given, k))) for k in sorted(values, key=order.index))
    return NodeOverride(pattern, options, items)


def _default(cls: type[PassOptions], name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def describe_options(cls: type[PassOptions]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option, for list-passes and the README."""
    types = _field_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        annotation = types[f.name]
        if get_origin(annotation) is Literal:
            kind = "|".join(get_args(annotation))
        else:
            kind = re.sub(r"<class '(\w+)'>", r"\1", str(annotation)).replace("typing.", "")
        rows.append((f.name, kind, format_value(f.default), f.metadata.get("help", "")))
    return rows
