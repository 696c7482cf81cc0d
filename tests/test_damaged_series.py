"""A series whose pixel data does not match its headers, on the running node (issue 13,
kind 9): received as sent, never segmented, its job failed once with the instance named,
nothing sent. (The preview of a result on a damaged source: test_preview_damaged.py.)

The many kinds of damage are unit-tested against the volume reader in test_pixel_data.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Dispatch, Event, Instance, Job, Result
from devkit.synth import generate_study
from tests.conftest import storescu, wait_until


def _dataset_bytes(path: Path) -> bytes:
    """The file's data set as encoded, without preamble and file meta (PS3.10 7.1)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL
    return data[144 + group_length :]


def _rows_doubled(files: list[Path], folder: Path) -> list[Path]:
    """The issue's example: every slice rewritten with Rows/Columns doubled, its PixelData
    left as it was (a quarter of the bytes the header now asks for)."""
    folder.mkdir()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = 2 * ds.Rows, 2 * ds.Columns
        out.append(folder / path.name)
        ds.save_as(out[-1])
    return out


@pytest.mark.slow
def test_damaged_series_fails_its_job_once_and_sends_nothing(tmp_path, orthanc, start_node):
    node = start_node(
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ]  # fmt: skip
    )
    study = generate_study(
        tmp_path / "study", seed=31, phases="P", rows=96, columns=96, pixel_spacing_mm=4.0
    )
    sent = _rows_doubled(study.series[0].files, tmp_path / "damaged")
    proc = storescu(sent, node.settings.port)
    assert proc.returncode == 0, proc.stderr

    def job() -> Job | None:
        with node.db.session() as s:
            return s.scalars(select(Job)).one_or_none()

    failed = wait_until(lambda: (j := job()) and j.state == "failed" and j, 180, "the job failed")
    assert failed.pipeline == "tumor"
    assert failed.attempts == 1  # an input error: not retried
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sent}
    named = [uid for uid in uids if uid in failed.last_error]
    assert len(named) >= 1, failed.last_error
    assert "SeriesReadError" in failed.last_error and "short by" in failed.last_error

    with node.db.session() as s:
        # Received losslessly: every instance stored with the bytes the sender sent.
        stored = {i.sop_uid: Path(i.path) for i in s.scalars(select(Instance))}
        assert set(stored) == set(uids)
        for uid, path in uids.items():
            assert _dataset_bytes(stored[uid]) == _dataset_bytes(path)
        # The stored path is what the job error names.
        assert str(stored[named[0]]) in failed.last_error
        assert s.scalars(select(Dispatch)).all() == []
        assert s.scalars(select(Result)).all() == []
        events = [e.message for e in s.scalars(select(Event).where(Event.job_id == failed.id))]
        assert any(named[0] in m for m in events), events
    time.sleep(2)  # a send would have been queued with the result, in the same transaction
    assert orthanc.count_instances() == 0
