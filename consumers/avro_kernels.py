"""Compiled (numba) kernels that decode many Avro messages (Confluent wire format) straight into numpy buffers.

The kernels know nothing about TraceEvent: they run a *field program* (one row per writer-schema field,
built by ``consumers.avro_program`` from the .avsc) over every message, so a schema change is a data change.
Each message gets a status code instead of an exception, which isolates a poison message exactly: its
partial output is discarded and the batch carries on. Output buffers are preallocated by the caller and
nothing is allocated per message. ``nogil=True`` lets the Delta writer thread run while a batch decodes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Field program opcodes (column 0 of a program row).
OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BOOL, OP_STRING, OP_BYTES, OP_ENUM = range(8)
OP_ARRAY_INT, OP_ARRAY_LONG = 8, 9

# Per-message status codes; consumers.avro_program maps them to DLQ reasons and details.
OK, TRUNCATED, TRAILING, BAD_UNION, BAD_LENGTH, VARINT_OVERFLOW, INT_RANGE, BAD_UTF8, BAD_BOOL, BAD_ENUM = (
    range(10)
)
HEADER_LEN = 5  # 00 + 4-byte big-endian schema registry id
NOT_AVRO = -1  # schema_ids result for a message without the wire-format header

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


@njit(cache=True, nogil=True, inline="always")
def _varint(buf, pos, end):
    """Zigzag varint at ``pos`` -> (value, next pos); next pos is -TRUNCATED or -VARINT_OVERFLOW on error."""
    acc = np.uint64(0)
    shift = np.uint64(0)
    while True:
        if pos >= end:
            return np.int64(0), -TRUNCATED
        b = buf[pos]
        pos += 1
        acc |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            break
        shift += np.uint64(7)
        if shift > np.uint64(63):
            return np.int64(0), -VARINT_OVERFLOW
    return np.int64(acc >> np.uint64(1)) ^ -np.int64(acc & np.uint64(1)), pos


@njit(cache=True, nogil=True, inline="always")
def _varint32_unchecked(buf, pos):
    """Fast path for int items with >= 5 bytes left (no bounds checks): -> (value, next pos), next pos is
    -INT_RANGE when the varint is longer than an int's 5 bytes (the slow path then reports it exactly)."""
    b = np.int64(buf[pos])
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    acc = b & 0x7F
    for k in range(1, 5):
        b = np.int64(buf[pos + k])
        acc |= (b & 0x7F) << (7 * k)
        if b < 0x80:
            return (acc >> 1) ^ -(acc & 1), pos + k + 1
    return np.int64(0), -INT_RANGE


@njit(cache=True, nogil=True)
def _valid_utf8(buf, pos, end):
    """Strict UTF-8 (no overlongs, surrogates or code points > U+10FFFF), as Python's decoder."""
    while pos < end:
        b = buf[pos]
        if b < 0x80:
            pos += 1
            continue
        if 0xC2 <= b <= 0xDF:
            n, lo, hi = 1, 0x80, 0xBF
        elif 0xE0 <= b <= 0xEF:
            n = 2
            lo = 0xA0 if b == 0xE0 else 0x80
            hi = 0x9F if b == 0xED else 0xBF
        elif 0xF0 <= b <= 0xF4:
            n = 3
            lo = 0x90 if b == 0xF0 else 0x80
            hi = 0x8F if b == 0xF4 else 0xBF
        else:
            return False
        if pos + n >= end:
            return False
        if buf[pos + 1] < lo or buf[pos + 1] > hi:
            return False
        for k in range(2, n + 1):
            if buf[pos + k] < 0x80 or buf[pos + k] > 0xBF:
                return False
        pos += n + 1
    return True


@njit(cache=True, nogil=True)
def schema_ids(buf, starts, ends):
    """The registry schema id in each message's header, or NOT_AVRO (no ``00`` magic, or too short)."""
    n = len(starts)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        s = starts[i]
        if ends[i] - s < HEADER_LEN or buf[s] != 0:
            out[i] = NOT_AVRO
            continue
        sid = np.int64(0)
        for k in range(1, HEADER_LEN):
            sid = (sid << 8) | np.int64(buf[s + k])
        out[i] = sid
    return out


@njit(cache=True, nogil=True)
def _read_array(buf, pos, end, arena, fill, int32_items):
    """Avro array blocks of int/long appended to ``arena[fill:]`` -> (next pos or -status, new fill)."""
    while True:
        blk, pos = _varint(buf, pos, end)
        if pos < 0 or blk == 0:
            return pos, fill
        if blk < 0:  # a negative count is followed by the block's byte size (lets readers skip it)
            blk = -blk
            _, pos = _varint(buf, pos, end)
            if pos < 0:
                return pos, fill
        if blk > end - pos:  # every item takes at least one byte
            return -TRUNCATED, fill
        for _ in range(blk):
            if int32_items and end - pos >= 5:
                v, nxt = _varint32_unchecked(buf, pos)
                if nxt < 0:
                    v, nxt = _varint(buf, pos, end)
                pos = nxt
            else:
                v, pos = _varint(buf, pos, end)
            if pos < 0:
                return pos, fill
            if int32_items and (v < _INT32_MIN or v > _INT32_MAX):
                return -INT_RANGE, fill
            arena[fill] = v
            fill += 1


@njit(cache=True, nogil=True)
def _read_scalar(op, aux, buf, pos, end):
    """One non-array value -> (next pos or -status, value, length). Floats come back as their raw bits;
    strings/bytes as (start position, length)."""
    if op in (OP_INT, OP_LONG, OP_ENUM):
        v, pos = _varint(buf, pos, end)
        if pos < 0:
            return pos, 0, 0
        if op == OP_INT and (v < _INT32_MIN or v > _INT32_MAX):
            return -INT_RANGE, 0, 0
        if op == OP_ENUM and (v < 0 or v >= aux):
            return -BAD_ENUM, 0, 0
        return pos, v, 0
    if op in (OP_FLOAT, OP_DOUBLE):
        width = 4 if op == OP_FLOAT else 8
        if end - pos < width:
            return -TRUNCATED, 0, 0
        bits = np.uint64(0)
        for k in range(width):
            bits |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
        return pos + width, np.int64(bits), 0
    if op == OP_BOOL:
        if pos >= end:
            return -TRUNCATED, 0, 0
        if buf[pos] > 1:
            return -BAD_BOOL, 0, 0
        return pos + 1, np.int64(buf[pos]), 0
    n, pos = _varint(buf, pos, end)  # OP_STRING / OP_BYTES
    if pos < 0:
        return pos, 0, 0
    if n < 0:
        return -BAD_LENGTH, 0, 0
    if n > end - pos:
        return -TRUNCATED, 0, 0
    if op == OP_STRING and not _valid_utf8(buf, pos, pos + n):
        return -BAD_UTF8, 0, 0
    return pos + n, pos, n


@njit(cache=True, nogil=True)
def decode_messages(buf, starts, ends, rows, prog, out_int, valid, bytes_arena, int_arena, long_arena):
    """Run the field program ``prog`` over messages ``rows``; output column ``i`` is message ``rows[i]``.

    Program row f = (op, slot, null branch or -1, enum size). Scalars go to ``out_int[f, i]`` (floats as raw
    bits). Strings/bytes and array items are appended to row ``slot`` of their arena (``bytes_arena``,
    ``int_arena``, ``long_arena``) and ``out_int[f, i]`` gets their start there, so the arena rows are
    ready-made Arrow value buffers. ``valid[f, i]`` is 0 for a null union branch. A failed message's arena
    items are rolled back, hence rows that decoded stay contiguous. Returns (status, failed field or -1)
    per message and the final fill of every field (its arena end).
    """
    n, n_fields = len(rows), prog.shape[0]
    status = np.zeros(n, dtype=np.int8)
    failed_field = np.full(n, -1, dtype=np.int16)
    fill = np.zeros(n_fields, dtype=np.int64)
    mark = np.zeros(n_fields, dtype=np.int64)
    for i in range(n):
        pos, end = starts[rows[i]] + HEADER_LEN, ends[rows[i]]
        mark[:] = fill
        for f in range(n_fields):
            op, slot, null_branch, aux = prog[f, 0], prog[f, 1], prog[f, 2], prog[f, 3]
            out_int[f, i] = fill[f]  # start of this row's items (a null or scalar overwrites/ignores it)
            if null_branch >= 0:
                branch, pos = _varint(buf, pos, end)
                if pos >= 0 and branch != 0 and branch != 1:
                    pos = -BAD_UNION
                if pos < 0:
                    failed_field[i] = f
                    break
                if branch == null_branch:
                    continue  # valid stays 0
            valid[f, i] = 1
            if op == OP_ARRAY_INT:
                pos, fill[f] = _read_array(buf, pos, end, int_arena[slot], fill[f], True)
            elif op == OP_ARRAY_LONG:
                pos, fill[f] = _read_array(buf, pos, end, long_arena[slot], fill[f], False)
            else:
                pos, v, length = _read_scalar(op, aux, buf, pos, end)
                if op in (OP_STRING, OP_BYTES):
                    if pos >= 0:
                        bytes_arena[slot, fill[f] : fill[f] + length] = buf[v : v + length]
                        fill[f] += length
                else:
                    out_int[f, i] = v
            if pos < 0:
                failed_field[i] = f
                break
        if pos >= 0 and pos != end:
            pos = -TRAILING
        if pos < 0:
            status[i] = -pos
            fill[:] = mark
    return status, failed_field, fill
