"""Append-only spill files: where trace events wait on local disk while Kafka is unreachable.

Each record is ``[u32 crc32][u32 key_len][u32 value_len][key][value]``. A torn tail (crash mid-write) is
detected by length/CRC and ignored. Files are numbered; replay reads them oldest first, record by record,
so events reach Kafka in the order they were spilled. Only the emitter's own thread touches these files, so
the directory is listed once and the list is kept in memory (``pending()`` is asked on every loop turn).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct(">III")


def encode_record(key: bytes, value: bytes) -> bytes:
    body = key + value
    return _HEADER.pack(zlib.crc32(body), len(key), len(value)) + body


def read_records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs in order; stop at the first torn or corrupt record."""
    with path.open("rb") as f:
        while header := f.read(_HEADER.size):
            if len(header) < _HEADER.size:
                return
            crc, key_len, value_len = _HEADER.unpack(header)
            body = f.read(key_len + value_len)
            if len(body) < key_len + value_len or zlib.crc32(body) != crc:
                return
            yield body[:key_len], body[key_len:]


class SpillDir:
    """A directory of numbered spill files; the newest one is appended to."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._writer = None
        self._writer_path: Path | None = None
        self._files: list[Path] | None = None  # listed on first use, then kept up to date here

    def files(self) -> list[Path]:
        if self._files is None:
            found = self.directory.glob("spill-*.bin") if self.directory.exists() else []
            self._files = sorted(found, key=lambda p: int(p.stem.split("-")[1]))
        return list(self._files)

    def append(self, key: bytes, value: bytes) -> None:
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = self.files()
            seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
            self._writer_path = self.directory / f"spill-{seq:08d}.bin"
            self._writer = self._writer_path.open("ab")
            self._files.append(self._writer_path)
        self._writer.write(encode_record(key, value))
        self._writer.flush()  # in the OS page cache: survives a process crash

    def seal(self) -> None:
        """Close the file being appended to, so replay can read it to the end and remove it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._writer_path = None

    def remove(self, path: Path) -> None:
        """Delete a fully replayed file (and its acknowledged-prefix marker)."""
        path.unlink(missing_ok=True)
        path.with_suffix(".acked").unlink(missing_ok=True)
        if self._files is not None and path in self._files:
            self._files.remove(path)

    def pending(self) -> bool:
        if self._files is None:
            self.files()
        return bool(self._files)
