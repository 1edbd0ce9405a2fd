"""Spill files on their own: the byte cap, the write that leaves nothing behind, the persisted replay
position, streaming reads."""

from __future__ import annotations

import pytest

from producers.spill import AckedPrefix, SpillDir, SpillFull, encode_record, read_records


def test_cap_refuses_a_record_that_would_pass_it_and_keeps_what_is_on_disk(tmp_path):
    record_size = len(encode_record(b"k", b"v" * 100))
    spill = SpillDir(
        tmp_path / "spill", max_bytes=3 * record_size + 20
    )  # room for a 13-byte record, not a 113-byte one
    for _ in range(3):
        spill.append(b"k", b"v" * 100)
    with pytest.raises(SpillFull):
        spill.append(b"k", b"v" * 100)
    spill.append(b"k", b"")  # a smaller record still fits under the cap
    spill.seal()
    assert spill.size_bytes() == 3 * record_size + len(encode_record(b"k", b""))
    assert [v for _, v in read_records(spill.files()[0])] == [b"v" * 100] * 3 + [b""]


def test_size_is_counted_from_disk_on_first_use_and_freed_by_remove(tmp_path):
    first = SpillDir(tmp_path / "spill")
    first.append(b"k", b"abc")
    first.seal()
    first.append(b"k", b"defg")
    first.seal()
    again = SpillDir(tmp_path / "spill", max_bytes=10_000)
    assert again.size_bytes() == len(encode_record(b"k", b"abc")) + len(encode_record(b"k", b"defg"))
    again.remove(again.files()[0])
    assert again.size_bytes() == len(encode_record(b"k", b"defg"))


def test_acked_prefix_is_rewritten_in_place(tmp_path):
    spill_file = tmp_path / "spill-00000000.bin"
    marker = AckedPrefix(spill_file)
    assert marker.read() == 0
    marker.write(123456)
    size = marker.path.stat().st_size
    marker.write(7)
    marker.close()
    assert marker.path.stat().st_size == size  # never grows: rewriting needs no new block on a full disk
    assert AckedPrefix(spill_file).read() == 7


def test_acked_prefix_written_by_earlier_versions_is_read(tmp_path):
    spill_file = tmp_path / "spill-00000000.bin"
    spill_file.with_suffix(".acked").write_text("42")
    assert AckedPrefix(spill_file).read() == 42


def test_read_records_streams_and_stops_at_a_torn_tail(tmp_path):
    spill = SpillDir(tmp_path / "spill")
    for i in range(3):
        spill.append(b"k", f"v{i}".encode())
    spill.seal()
    path = spill.files()[0]
    with path.open("ab") as f:
        f.write(encode_record(b"k", b"torn")[:-2])
    records = read_records(path)
    assert next(records) == (b"k", b"v0")  # a generator: nothing read beyond what is asked for
    assert list(records) == [(b"k", b"v1"), (b"k", b"v2")]
