"""``Spool.write`` writes an instance's parts with ``writev`` and finishes a short write
(a signal, a nearly full disk) where it stopped, so the file holds every byte in order."""

from __future__ import annotations

import array
import os
from pathlib import Path

import pytest

from dicom_node import spool as spool_module
from dicom_node.spool import Spool


@pytest.mark.parametrize("most_bytes", [1, 7, 4096, None])
def test_parts_are_written_whole_and_in_order_however_short_each_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, most_bytes: int | None
) -> None:
    real_writev = os.writev
    calls: list[int] = []

    def short_writev(fd: int, buffers: list[memoryview]) -> int:
        # The kernel may write less than asked: here at most ``most_bytes`` per call.
        if most_bytes is not None:
            budget, cut = most_bytes, []
            for view in buffers:
                if budget <= 0:
                    break
                cut.append(view[:budget])
                budget -= len(cut[-1])
            buffers = cut
        calls.append(len(buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(spool_module.os, "writev", short_writev)
    parts = [b"meta-", b"", bytearray(b"first fragment "), memoryview(b"second"), b"!" * 5000]
    parts.append(array.array("h", [1, -2, 3]))  # 2-byte items: written as their 6 bytes
    spool = Spool(tmp_path / "spool", 0)
    path = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", parts)
    expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert path.read_bytes() == expected
    if most_bytes is None:
        assert len(calls) == 1  # one system call for the whole instance
    assert not list((tmp_path / "spool").rglob("*.part"))
