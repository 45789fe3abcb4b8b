"""Put tensor bytes back into a serialized ONNX model by editing its protobuf wire format.

Pack empties the ``raw_data`` of the tensors it takes out and serializes the model; each such
tensor then holds field 9 with length 0. :func:`fill_raw_data` writes each payload into its
tensor's empty field and rewrites the length prefix of every message that encloses it, copying
every other byte as it is. For a graph that protobuf serialized (pack's), that is what setting
``raw_data`` and serializing again gives: the field keeps its place, and an enclosing message's
length is that of its content (tested against protobuf on every model of the archive tests;
pack checks the result on every model it packs anyway). Unpacking becomes one pass over the
graph's fields and a join of the pieces, without re-encoding the rest of the model.

Tensors are named by the archive's locators (``graph.initializer[3]``,
``graph.node[7].then_branch.node[0].value``, ``functions[0].node[2].value``, see
:mod:`onnxcompress.archive`); only messages on the way to a listed tensor are walked.
"""

from __future__ import annotations

from typing import Callable

# Field numbers of onnx.proto3 that lead to tensors.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_NAME, _ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 1, 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2


class WireError(ValueError):
    """The bytes are not the serialized model the locators describe."""


def fill_raw_data(model: bytes, payloads: dict[str, bytes]) -> bytes:
    """``model`` (a serialized ModelProto) with the empty ``raw_data`` of the tensor at each
    locator of ``payloads`` holding its payload."""
    view = memoryview(model).cast("B")
    prefixes = {locator[:i] for locator in payloads for i in range(len(locator) + 1)}
    filled: set[str] = set()
    walker = _Walker(view, payloads, prefixes, filled)
    pieces = walker.model(0, len(view))
    missing = set(payloads) - filled
    if missing:
        raise WireError(f"no emptied tensor at {sorted(missing)[0]}")
    return b"".join(pieces)


class _Walker:
    def __init__(self, view: memoryview, payloads: dict[str, bytes], prefixes: set[str], filled: set[str]):
        self.view, self.payloads, self.prefixes, self.filled = view, payloads, prefixes, filled

    # Each method returns the pieces of the message's content between start and end.

    def model(self, start: int, end: int) -> list:
        return self._message(start, end, self._fields("", {
            _MODEL_GRAPH: ("graph", self.graph), _MODEL_FUNCTIONS: ("functions[{i}]", self.function)}))

    def graph(self, start: int, end: int, where: str) -> list:
        return self._message(start, end, self._fields(where, {
            _GRAPH_NODE: (".node[{i}]", self.node), _GRAPH_INITIALIZER: (".initializer[{i}]", self.tensor),
            _GRAPH_SPARSE: (".sparse_initializer[{i}]", self.sparse)}))

    def function(self, start: int, end: int, where: str) -> list:
        return self._message(start, end, self._fields(where, {_FUNCTION_NODE: (".node[{i}]", self.node)}))

    def node(self, start: int, end: int, where: str) -> list:
        def child(number, index, content, after):
            if number != _NODE_ATTRIBUTE:
                return None
            name_start, name_end = self._string_field(content, after, _ATTR_NAME)
            return f"{where}.{bytes(self.view[name_start:name_end]).decode('utf-8', 'replace')}", self.attribute

        return self._message(start, end, child)

    def attribute(self, start: int, end: int, where: str) -> list:
        return self._message(start, end, self._fields(where, {
            _ATTR_T: ("", self.tensor), _ATTR_G: ("", self.graph), _ATTR_SPARSE: ("", self.sparse),
            _ATTR_TENSORS: ("[{i}]", self.tensor), _ATTR_GRAPHS: ("[{i}]", self.graph),
            _ATTR_SPARSES: ("[{i}]", self.sparse)}))

    def sparse(self, start: int, end: int, where: str) -> list:
        return self._message(start, end, self._fields(where, {
            _SPARSE_VALUES: (".values", self.tensor), _SPARSE_INDICES: (".indices", self.tensor)}))

    @staticmethod
    def _fields(where: str, table: dict[int, tuple[str, Callable]]) -> Callable:
        """The ``child`` of :meth:`_message` for a message whose fields on the way to tensors
        are ``table``: field number -> (locator suffix, with ``{i}`` for the field's index
        among its repeats; walker)."""
        def child(number, index, content, after):
            entry = table.get(number)
            return None if entry is None else (where + entry[0].format(i=index), entry[1])

        return child

    def tensor(self, start: int, end: int, where: str) -> list:
        payload = self.payloads.get(where)
        if payload is None:
            return [self.view[start:end]]
        pieces, position, done = [], start, False
        while position < end:
            number, wire_type, content, after = _read_field(self.view, position, end)
            if number == _TENSOR_RAW_DATA and wire_type == _LENGTH_DELIMITED and not done:
                if after != content:
                    raise WireError(f"tensor at {where} was not emptied")
                pieces += [self.view[position:_tag_end(self.view, position)], _varint(len(payload)), payload]
                done = True
            else:
                pieces.append(self.view[position:after])
            position = after
        if not done:
            raise WireError(f"tensor at {where} has no emptied raw_data")
        self.filled.add(where)
        return pieces

    # ------------------------------------------------------------------ the wire format

    def _message(self, start: int, end: int, child: Callable) -> list:
        """The pieces of a message whose children ``child(number, index, content, after)``
        names as (locator, walker) or None; a child on no listed tensor's way is copied whole."""
        pieces, position, index = [], start, {}
        while position < end:
            number, wire_type, content, after = _read_field(self.view, position, end)
            found = child(number, index.get(number, 0), content, after) if wire_type == _LENGTH_DELIMITED else None
            index[number] = index.get(number, 0) + 1
            if found is not None and found[0] in self.prefixes:
                where, walk = found
                inner = walk(content, after, where)
                pieces += [self.view[position:_tag_end(self.view, position)], _varint(sum(len(p) for p in inner)), *inner]
            else:
                pieces.append(self.view[position:after])
            position = after
        return pieces

    def _string_field(self, start: int, end: int, number: int) -> tuple[int, int]:
        position = start
        while position < end:
            n, wire_type, content, after = _read_field(self.view, position, end)
            if n == number and wire_type == _LENGTH_DELIMITED:
                return content, after
            position = after
        return start, start


def _read_varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise WireError("truncated or malformed varint")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _read_field(view: memoryview, position: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, content start, field end) of the field at ``position``."""
    key, content = _read_varint(view, position, end)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
        _, after = _read_varint(view, content, end)
    elif wire_type == 1:
        after = content + 8
    elif wire_type == 2:
        length, content = _read_varint(view, content, end)
        after = content + length
    elif wire_type == 5:
        after = content + 4
    else:
        raise WireError(f"unsupported wire type {wire_type} (field {number})")
    if after > end:
        raise WireError(f"field {number} runs past the end of its message")
    return number, wire_type, content, after


def _tag_end(view: memoryview, position: int) -> int:
    _, after = _read_varint(view, position, len(view))
    return after


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
