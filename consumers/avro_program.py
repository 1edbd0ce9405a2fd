"""Field programs derived from Avro schemas, and the Arrow columns built from what the kernels decode.

``FieldProgram.for_schema`` turns a writer schema (as in ``schemas/``) into the opcode table the numba
kernels run; ``decode_rows`` runs it over a batch; ``ArrowProjection`` builds Arrow arrays for the rows that
decoded and projects them onto the *reader's* (current) Arrow schema: fields the writer lacks get their
Avro default, promoted types are cast (Avro schema resolution, BACKWARD). Supported field types are the ones
``schemas.arrow`` maps: primitives, enums, ``["null", T]`` unions and arrays of int/long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from consumers import avro_kernels as k
from schemas.registry import SchemaVersion

_SCALAR_OPS = {
    "int": k.OP_INT,
    "long": k.OP_LONG,
    "float": k.OP_FLOAT,
    "double": k.OP_DOUBLE,
    "boolean": k.OP_BOOL,
    "string": k.OP_STRING,
    "bytes": k.OP_BYTES,
}
_ARRAY_OPS = {"int": k.OP_ARRAY_INT, "long": k.OP_ARRAY_LONG}
_STATUS_DETAIL = {
    k.TRUNCATED: "truncated",
    k.TRAILING: "trailing bytes after the record",
    k.BAD_UNION: "union branch index out of range",
    k.BAD_LENGTH: "negative length",
    k.VARINT_OVERFLOW: "varint longer than 10 bytes",
    k.INT_RANGE: "int outside 32 bits",
    k.BAD_UTF8: "invalid UTF-8 in a string",
    k.BAD_BOOL: "boolean byte not 0/1",
    k.BAD_ENUM: "enum index out of range",
}


def status_detail(status: int, field: str | None) -> str:
    """Human detail for a kernel status (the DLQ reason itself is always ``malformed-avro``)."""
    where = f" in field {field!r}" if field else ""
    return f"{_STATUS_DETAIL.get(status, f'status {status}')}{where}"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    op: int
    null_branch: int  # index of the "null" branch of a ["null", T] union, -1 if not a union
    symbols: tuple[str, ...] = ()  # enum symbols


def _base(avro: Any) -> Any:
    """Unwrap {"type": "long", ...} (logical types are stripped by schemas.registry) to "long"."""
    while isinstance(avro, dict) and avro["type"] not in ("array", "enum"):
        avro = avro["type"]
    return avro


def _field_spec(name: str, avro: Any) -> FieldSpec:
    null_branch = -1
    if isinstance(avro, list):
        others = [b for b in avro if b != "null"]
        if len(avro) != 2 or len(others) != 1:
            raise TypeError(f"field {name!r}: only ['null', T] unions are supported, got {avro}")
        null_branch, avro = avro.index("null"), others[0]
    avro = _base(avro)
    if isinstance(avro, str) and avro in _SCALAR_OPS:
        return FieldSpec(name, _SCALAR_OPS[avro], null_branch)
    if isinstance(avro, dict) and avro["type"] == "enum":
        return FieldSpec(name, k.OP_ENUM, null_branch, tuple(avro["symbols"]))
    if isinstance(avro, dict) and avro["type"] == "array" and _base(avro["items"]) in _ARRAY_OPS:
        return FieldSpec(name, _ARRAY_OPS[_base(avro["items"])], null_branch)
    raise TypeError(f"field {name!r}: Avro type {avro} is not supported by the batch decoder")


_ARENA_OF_OP = {k.OP_STRING: 0, k.OP_BYTES: 0, k.OP_ARRAY_INT: 1, k.OP_ARRAY_LONG: 2}


@dataclass(frozen=True)
class FieldProgram:
    """The opcode table of one writer schema: row f = (op, arena slot, null branch, enum size) of field f.

    Variable-length fields get a slot (row) in one of three arenas: bytes (strings, bytes), int32 items,
    int64 items; ``arena_rows`` counts the slots of each.
    """

    fields: tuple[FieldSpec, ...]
    table: np.ndarray  # int64 (n_fields, 4)
    arena_rows: tuple[int, int, int]

    @classmethod
    def for_fields(cls, avro_fields: list[dict[str, Any]]) -> FieldProgram:
        specs = tuple(_field_spec(f["name"], f["type"]) for f in avro_fields)
        used = [0, 0, 0]
        rows = []
        for s in specs:
            arena = _ARENA_OF_OP.get(s.op)
            slot = -1 if arena is None else used[arena]
            if arena is not None:
                used[arena] += 1
            rows.append((s.op, slot, s.null_branch, len(s.symbols)))
        return cls(specs, np.array(rows, dtype=np.int64).reshape(len(specs), 4), tuple(used))

    @classmethod
    def for_schema(cls, schema: SchemaVersion) -> FieldProgram:
        return cls.for_fields(schema.parsed["fields"])


@dataclass
class DecodedRows:
    """Kernel output for the messages of one writer schema (per-field outputs indexed [field, row])."""

    program: FieldProgram
    out_int: np.ndarray
    valid: np.ndarray
    arenas: tuple[np.ndarray, np.ndarray, np.ndarray]  # bytes, int32 items, int64 items
    fill: np.ndarray  # per field: end of its items in its arena row
    status: np.ndarray  # int8 per row, avro_kernels.OK when the row decoded
    failed_field: np.ndarray  # int16 per row, -1 when none


class DecodeScratch:
    """Kernel output buffers reused from batch to batch (one per decoding thread).

    Fresh memory costs a page fault per 4 KiB on first touch, which measured as much as the decoding itself
    (~1.8 us of ~3.7 us per event); reused buffers stay resident instead. They grow to the largest batch
    seen and no further; ``field_array`` copies what a batch keeps into Arrow-pool buffers, so nothing
    handed out ever points into them.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        have = self._arrays.get(name)
        if have is None or have.shape[0] < shape[0] or have.shape[1] < shape[1] or have.dtype != dtype:
            grown = (
                max(shape[0], 0 if have is None else have.shape[0]),
                max(shape[1], 0 if have is None else have.shape[1]),
            )
            have = self._arrays[name] = np.empty(grown, dtype=dtype)
        return have[: shape[0], : shape[1]]


def decode_rows(
    program: FieldProgram,
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    rows: np.ndarray,
    scratch: DecodeScratch | None = None,
) -> DecodedRows:
    """Decode messages ``rows`` of ``buf`` (all written with ``program``'s schema).

    Arena rows are as long as the batch's total body bytes, which bounds what any one field can hold (an
    item takes at least one byte). The result is valid until the next call with the same ``scratch``.
    """
    scratch = scratch or DecodeScratch()
    n, n_fields = len(rows), len(program.fields)
    body = int((ends[rows] - starts[rows]).sum()) if n else 0
    n_bytes, n_ints, n_longs = program.arena_rows
    arenas = (
        scratch.get("bytes", (n_bytes, body), np.uint8),
        scratch.get("ints", (n_ints, body), np.int32),
        scratch.get("longs", (n_longs, body), np.int64),
    )
    out_int = scratch.get("out_int", (n_fields, n), np.int64)
    valid = scratch.get("valid", (n_fields, n), np.uint8)
    valid[:] = 0
    status, failed, fill = k.decode_messages(buf, starts, ends, rows, program.table, out_int, valid, *arenas)
    return DecodedRows(program, out_int, valid, arenas, fill, status, failed)


def _pooled(values: np.ndarray) -> pa.Buffer:
    """A copy of ``values`` in an Arrow memory-pool buffer (the pool recycles pages: no fresh faults)."""
    out = pa.allocate_buffer(values.nbytes)
    np.frombuffer(out, dtype=values.dtype)[:] = values
    return out


def field_array(rows: DecodedRows, f: int, keep: np.ndarray) -> pa.Array:
    """The Arrow array of field ``f`` in the writer's type, for ``keep`` = every row that decoded (status
    OK), ascending: failed rows took no arena space, so the kept rows' items are contiguous."""
    spec = rows.program.fields[f]
    op, slot = int(rows.program.table[f, 0]), int(rows.program.table[f, 1])
    n = len(keep)
    validity = None
    if spec.null_branch >= 0:
        validity = pa.py_buffer(np.packbits(rows.valid[f][keep], bitorder="little"))
    if op in _ARENA_OF_OP:
        offsets = np.append(rows.out_int[f][keep], rows.fill[f]).astype(np.int32)
        values = _pooled(rows.arenas[_ARENA_OF_OP[op]][slot, : rows.fill[f]])
        if op in (k.OP_STRING, k.OP_BYTES):
            typ = pa.string() if op == k.OP_STRING else pa.binary()
            return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets), values])
        item = pa.int32() if op == k.OP_ARRAY_INT else pa.int64()
        child = pa.Array.from_buffers(item, int(rows.fill[f]), [None, values])
        typ = pa.list_(pa.field("element", item, nullable=False))
        return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(offsets)], children=[child])
    raw = rows.out_int[f][keep]
    if op == k.OP_ENUM:
        mask = None if validity is None else rows.valid[f][keep] == 0
        indices = pa.array(raw.astype(np.int32), mask=mask)
        return pa.DictionaryArray.from_arrays(indices, pa.array(spec.symbols, pa.string())).cast(pa.string())
    if op == k.OP_INT:
        values, typ = raw.astype(np.int32), pa.int32()
    elif op == k.OP_LONG:
        values, typ = raw, pa.int64()
    elif op == k.OP_FLOAT:
        values, typ = raw.astype(np.uint32).view(np.float32), pa.float32()
    elif op == k.OP_DOUBLE:
        values, typ = raw.view(np.float64), pa.float64()
    else:
        values, typ = np.packbits(raw.astype(np.uint8), bitorder="little"), pa.bool_()
    return pa.Array.from_buffers(typ, n, [validity, pa.py_buffer(values)])


def _default_array(avro_field: dict[str, Any], typ: pa.DataType, n: int) -> pa.Array:
    default = avro_field["default"]
    if default is None:
        return pa.nulls(n, typ)
    return pa.array([default], typ).take(pa.array(np.zeros(n, dtype=np.int32)))


class ArrowProjection:
    """Builds reader-schema Arrow columns from a writer's decoded rows (Avro resolution by field name)."""

    def __init__(self, reader: SchemaVersion, reader_schema: pa.Schema):
        self.reader = reader
        self.schema = reader_schema
        self._avro_fields = {f["name"]: f for f in reader.raw["fields"]}

    def columns(self, rows: DecodedRows, keep: np.ndarray) -> list[pa.Array]:
        by_name = {spec.name: f for f, spec in enumerate(rows.program.fields)}
        out = []
        for field in self.schema:
            if field.name in by_name:
                arr = field_array(rows, by_name[field.name], keep)
                out.append(arr if arr.type == field.type else arr.cast(field.type))
            else:
                out.append(_default_array(self._avro_fields[field.name], field.type, len(keep)))
        return out
