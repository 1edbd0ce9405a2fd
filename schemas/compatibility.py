"""Avro BACKWARD compatibility as a pure function: can a reader with the new schema read old data?

Follows the Avro spec's schema-resolution rules (the same ones Confluent's BACKWARD check applies):
new fields need defaults, removed fields are fine, types may only be promoted, union branches must
resolve, enum symbols may only be added. Returns human-readable problems; empty means compatible.
"""

from __future__ import annotations

from typing import Any

PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "double": {"double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return schema["type"] if isinstance(schema["type"], str) else _kind(schema["type"])
    return schema


def _unwrap(schema: Any) -> Any:
    """Strip logical-type wrappers like {"type": "long", "logicalType": ...} down to the base type."""
    if isinstance(schema, dict) and schema["type"] in PROMOTIONS:
        return schema["type"]
    return schema


def backward_problems(reader: Any, writer: Any, path: str = "") -> list[str]:
    """Problems that stop ``reader`` from reading data written with ``writer`` (empty list = compatible)."""
    reader, writer = _unwrap(reader), _unwrap(writer)
    rk, wk = _kind(reader), _kind(writer)
    where = path or "<root>"
    if wk == "union":
        return [p for branch in writer for p in backward_problems(reader, branch, path)]
    if rk == "union":
        if any(not backward_problems(branch, writer, path) for branch in reader):
            return []
        return [f"{where}: no branch of reader union {reader} can read writer type {_kind(writer)}"]
    if rk in PROMOTIONS or wk in PROMOTIONS or rk == "null" or wk == "null":
        return [] if rk == wk or rk in PROMOTIONS.get(wk, ()) else [f"{where}: {wk} cannot be read as {rk}"]
    if rk != wk:
        return [f"{where}: {wk} cannot be read as {rk}"]
    if rk == "record":
        return _record_problems(reader, writer, path)
    if rk == "array":
        return backward_problems(reader["items"], writer["items"], f"{path}[]")
    if rk == "map":
        return backward_problems(reader["values"], writer["values"], f"{path}{{}}")
    if rk == "enum":
        missing = set(writer["symbols"]) - set(reader["symbols"])
        if missing and "default" not in reader:
            return [f"{where}: enum symbols {sorted(missing)} removed without a reader default"]
        return []
    if rk == "fixed" and reader["size"] != writer["size"]:
        return [f"{where}: fixed size {writer['size']} cannot be read as {reader['size']}"]
    return []


def _record_problems(reader: dict, writer: dict, path: str) -> list[str]:
    if reader["name"].split(".")[-1] != writer["name"].split(".")[-1] and writer["name"] not in reader.get(
        "aliases", []
    ):
        return [f"{path or '<root>'}: record {writer['name']} cannot be read as {reader['name']}"]
    writer_fields = {f["name"]: f for f in writer["fields"]}
    problems = []
    for field in reader["fields"]:
        names = [field["name"], *field.get("aliases", [])]
        match = next((writer_fields[n] for n in names if n in writer_fields), None)
        sub = f"{path}.{field['name']}" if path else field["name"]
        if match is None:
            if "default" not in field:
                problems.append(f"{sub}: new field has no default, old data cannot be read")
        else:
            problems.extend(backward_problems(field["type"], match["type"], sub))
    return problems
