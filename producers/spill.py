"""Append-only spill files: where trace events wait on local disk while Kafka is unreachable.

Each record is ``[u32 crc32][u32 key_len][u32 value_len][key][value]``. A torn tail (crash mid-write) is
detected by length/CRC and ignored. Files are numbered; replay reads them oldest first, record by record,
so events reach Kafka in the order they were spilled. Only the emitter's own thread touches these files, so
the directory is listed once and the list (and the bytes it holds) is kept in memory (``pending()`` is
asked on every loop turn).

The directory is capped (``max_bytes``): beyond the cap, and whenever the disk refuses a write, ``append``
raises ``OSError`` and the file is left as it was before the call (a partly written record is cut off
again), so one full disk costs the records it refused and nothing already on disk.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct(">III")
_PREFIX_WIDTH = 20  # the acknowledged-prefix marker is rewritten in place: never grows, needs no new space


class SpillFull(OSError):
    """The spill directory holds ``max_bytes`` already."""


def encode_record(key: bytes, value: bytes) -> bytes:
    body = key + value
    return _HEADER.pack(zlib.crc32(body), len(key), len(value)) + body


def read_records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs in order, streaming; stop at the first torn or corrupt record."""
    with path.open("rb") as f:
        while header := f.read(_HEADER.size):
            if len(header) < _HEADER.size:
                return
            crc, key_len, value_len = _HEADER.unpack(header)
            body = f.read(key_len + value_len)
            if len(body) < key_len + value_len or zlib.crc32(body) != crc:
                return
            yield body[:key_len], body[key_len:]


class AckedPrefix:
    """How many records of a spill file Kafka has acknowledged, persisted next to it (``.acked``).

    Written in place with a fixed width, so updating it on a full disk needs no new block."""

    def __init__(self, spill_file: Path):
        self.path = spill_file.with_suffix(".acked")
        self._fd: int | None = None

    def read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def write(self, n: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(self._fd, str(n).rjust(_PREFIX_WIDTH).encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SpillDir:
    """A directory of numbered spill files; the newest one is appended to."""

    def __init__(self, directory: Path, max_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self._fd_size = 0
        self._files: list[Path] | None = None  # listed on first use, then kept up to date here
        self._sizes: dict[Path, int] = {}
        self._total = 0  # sum of _sizes, kept as one int: read from other threads (the /metrics gauge)

    def files(self) -> list[Path]:
        if self._files is None:
            found = self.directory.glob("spill-*.bin") if self.directory.exists() else []
            self._files = sorted(found, key=lambda p: int(p.stem.split("-")[1]))
            self._sizes = {p: p.stat().st_size for p in self._files}
            self._total = sum(self._sizes.values())
        return list(self._files)

    def size_bytes(self) -> int:
        """Bytes the spill files hold now (as this process has kept count)."""
        if self._files is None:
            self.files()
        return self._total

    def known_bytes(self) -> int:
        """``size_bytes()`` as last counted, without listing the directory (0 before the first listing): safe
        to call from another thread."""
        return self._total

    def append(self, key: bytes, value: bytes) -> None:
        """Append one record, or raise ``OSError`` (``SpillFull`` at the cap) having written nothing."""
        record = encode_record(key, value)
        if self.max_bytes is not None and self.size_bytes() + len(record) > self.max_bytes:
            raise SpillFull(errno.ENOSPC, f"spill directory at its cap of {self.max_bytes:,} bytes")
        if self._fd is None:
            self._open_next()
        path = self._files[-1]
        written = 0
        try:
            while written < len(record):  # into the OS page cache: survives a process crash
                written += os.write(self._fd, record[written:])
        except OSError:
            if written:
                self._cut_back()
            raise
        self._fd_size += len(record)
        self._sizes[path] = self._fd_size
        self._total += len(record)

    def _open_next(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.files()
        seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.directory / f"spill-{seq:08d}.bin"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd_size = 0
        self._files.append(path)
        self._sizes[path] = 0

    def _cut_back(self) -> None:
        """Remove a partly written record; if even that fails, end the file there (replay stops at a torn
        record, so later records must go to a new file)."""
        try:
            os.ftruncate(self._fd, self._fd_size)
        except OSError:
            self.seal()

    def seal(self) -> None:
        """Close the file being appended to, so replay can read it to the end and remove it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def remove(self, path: Path) -> None:
        """Delete a fully replayed file (and its acknowledged-prefix marker). It leaves the listing even if
        the disk refuses the unlink (then raises): this process never replays it twice."""
        if self._files is not None and path in self._files:
            self._files.remove(path)
            self._total -= self._sizes.pop(path, 0)
        path.unlink(missing_ok=True)
        path.with_suffix(".acked").unlink(missing_ok=True)

    def pending(self) -> bool:
        if self._files is None:
            self.files()
        return bool(self._files)
