"""Which files an ``.onnx`` file makes ONNX Runtime read: a protobuf wire-format scan, stdlib only.

ONNX Runtime loads a tensor's bytes from another file when the tensor's ``data_location`` is
EXTERNAL; ``external_data`` then names the file (``location``, relative to the model's
directory) and the ``offset``/``length`` of the bytes. Tensors live in a graph's
initializers, in its sparse initializers, in node attributes (``Constant`` and friends) and in
subgraphs (``If``/``Loop``/``Scan`` bodies), and in model-local functions. This module walks
exactly those messages of ``ModelProto`` and skips everything else by its length, so weights
stored inline are never copied and the scan costs milliseconds on a bundle's graph files.

It is the runtime's way to hold a graph to its bundle's manifest without importing ``onnx``
(the base install has only onnxruntime): ``sorakit.bundle.io.Bundle.open`` checks that every
location is a file the manifest lists with its checksum. ``tests/test_bundle.py`` compares the
scan with ``onnx``'s own parsing.

Field numbers (onnx.proto3): ModelProto.graph 7, .training_info 20, .functions 25;
GraphProto.node 1, .initializer 5, .sparse_initializer 15; NodeProto.attribute 5;
AttributeProto.t 5, .g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23;
TensorProto.name 8, .external_data 13, .data_location 14; SparseTensorProto.values 1,
.indices 2; StringStringEntryProto.key 1, .value 2; TrainingInfoProto.initialization 1,
.algorithm 2; FunctionProto.node 7.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
READ_LIMIT = 64 * 2**20  # files up to this size are read; larger ones memory-mapped
MAX_DEPTH = 64  # nested subgraphs; deeper is refused rather than recursed into


class MalformedModel(ValueError):
    """The bytes are not a well-formed ONNX ModelProto (reported with the byte offset)."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str  # the tensor's name ('' if it has none)
    location: str | None  # as written in the file (relative to the model's directory)
    offset: str | None  # the raw strings of the entries; the caller checks they are numbers
    length: str | None
    external: bool  # data_location == EXTERNAL (what makes ONNX Runtime read the file)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise MalformedModel(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedModel(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview, start: int, end: int):
    """Yield (field number, wire type, value or start, end) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise MalformedModel(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, 0, value, pos
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise MalformedModel(f"a field of {n} bytes at byte {pos} runs past the end of its message ({end})")
            yield field, 2, pos, pos + n
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise MalformedModel(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise MalformedModel(f"a fixed-size field at byte {pos} runs past the end of its message ({end})")


def _text(buf: memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedModel(f"a string at byte {start} is not UTF-8") from None


class _Scan:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.refs: list[ExternalRef] = []

    def model(self, start: int, end: int) -> None:
        has_graph = False
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if field == 7:
                has_graph = True
                self.graph(a, b, 1)
            elif field == 20:  # TrainingInfoProto: initialization, algorithm
                for f2, w2, a2, b2 in _fields(self.buf, a, b):
                    if w2 == 2 and f2 in (1, 2):
                        self.graph(a2, b2, 1)
            elif field == 25:  # FunctionProto.node
                for f2, w2, a2, b2 in _fields(self.buf, a, b):
                    if w2 == 2 and f2 == 7:
                        self.node(a2, b2, 1)
        if not has_graph:
            raise MalformedModel("it holds no graph")

    def graph(self, start: int, end: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise MalformedModel(f"subgraphs nested more than {MAX_DEPTH} deep at byte {start}")
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if field == 5:
                self.tensor(a, b)
            elif field == 15:
                self.sparse(a, b)
            elif field == 1:
                self.node(a, b, depth)

    def node(self, start: int, end: int, depth: int) -> None:
        for field, wire, a, b in _fields(self.buf, start, end):
            if field == 5 and wire == 2:
                self.attribute(a, b, depth)

    def attribute(self, start: int, end: int, depth: int) -> None:
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire != 2:
                continue
            if field in (5, 10):
                self.tensor(a, b)
            elif field in (6, 11):
                self.graph(a, b, depth + 1)
            elif field in (22, 23):
                self.sparse(a, b)

    def sparse(self, start: int, end: int) -> None:
        for field, wire, a, b in _fields(self.buf, start, end):
            if wire == 2 and field in (1, 2):
                self.tensor(a, b)

    def tensor(self, start: int, end: int) -> None:
        name, location, entries = "", 0, {}
        for field, wire, a, b in _fields(self.buf, start, end):
            if field == 8 and wire == 2:
                name = _text(self.buf, a, b)
            elif field == 14 and wire == 0:
                location = a
            elif field == 13 and wire == 2:
                key = value = ""
                for f2, w2, a2, b2 in _fields(self.buf, a, b):
                    if w2 == 2 and f2 == 1:
                        key = _text(self.buf, a2, b2)
                    elif w2 == 2 and f2 == 2:
                        value = _text(self.buf, a2, b2)
                entries[key] = value
        if location == EXTERNAL or entries:
            self.refs.append(ExternalRef(name, entries.get("location"), entries.get("offset"), entries.get("length"),
                                         location == EXTERNAL))


def scan_bytes(data: bytes | bytearray | memoryview) -> list[ExternalRef]:
    """Every tensor of a serialised ModelProto that has external data (or says it has)."""
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    scan = _Scan(buf)
    scan.model(0, len(buf))
    return scan.refs


def external_refs(path: str | Path) -> list[ExternalRef]:
    """``scan_bytes`` of a file; a large file is memory-mapped, so inline weights are skipped, not read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise MalformedModel("the file is empty")
        if size <= READ_LIMIT:
            return scan_bytes(f.read())
        # not closed explicitly: a failed scan's traceback may still reference the view; the
        # mapping goes with its last reference
        return scan_bytes(memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)))
