"""UIDs as senders send them: tolerated where a PACS tolerates them, refused where unsafe.

Also one SOP Instance UID in two series, and a series UID reused by another study, over a
real association (pynetdicom SCU -> the node's SCP -> spool + database).
"""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Event, Instance, Series
from dicom_node.assembler import AssociationTracker
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from kernel.uids import InvalidUIDError, accept_uid, is_valid_uid
from tests.conftest import node_settings
from tests.dicom_factory import ct_slice
from tests.scp_helpers import associate, dataset_bytes, send_raw


@pytest.mark.parametrize(
    "raw, stored, problem",
    [
        ("1.2.840.10008.1.2", "1.2.840.10008.1.2", None),
        ("1.2.3.0604688119.5", "1.2.3.0604688119.5", "leading zero (0604688119)"),
        ("1.2.03.4", "1.2.03.4", "leading zero (03)"),
        ("1.2.3\x00", "1.2.3", None),
        ("1.2.3 ", "1.2.3", None),
        (" 1.2.3\x00\x00", "1.2.3", None),
        ("1.2." + "4" * 60 + "\x00\x00", "1.2." + "4" * 60, None),  # 66 bytes with padding
        ("1.2..3", "1.2..3", "empty component"),
        ("1.2.3.", "1.2.3.", "empty component"),
        ("12345", "12345", "single component"),
    ],
)
def test_tolerated_uids_are_stored_as_received_without_padding(raw, stored, problem):
    uid, why = accept_uid(raw, "SOPInstanceUID")
    assert uid == stored
    if problem is None:
        assert why is None and is_valid_uid(uid)
    else:
        assert problem in why and "SOPInstanceUID" in why


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("1.2.3/../../4", "not a DICOM UID"),
        ("..", "not a DICOM UID"),
        (".", "not a DICOM UID"),
        (".1.2", "not a DICOM UID"),
        ("1.2.abc", "not a DICOM UID"),
        ("1.2.3\\4", "not a DICOM UID"),
        ("1.2.3-4", "not a DICOM UID"),
        ("", "is empty"),
        ("\x00\x00", "is empty"),
        ("1." + "2" * 64, "more than 64"),
    ],
)
def test_unsafe_or_foreign_values_are_refused(raw, reason):
    with pytest.raises(InvalidUIDError, match=reason):
        accept_uid(raw, "SeriesInstanceUID")


@pytest.fixture
def scp(tmp_path, db):
    settings = node_settings(tmp_path)
    server = StorageSCP(
        settings, db, Spool(settings.spool_dir, settings.min_free_bytes), AssociationTracker()
    )
    server.start()
    yield server
    server.stop()


def _events(db, kind: str) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)))


def test_leading_zero_and_padded_uids_are_accepted_over_the_wire(scp, db):
    study, series = generate_uid(), "1.2.826.0.1.3680043.9.0604688119"
    assoc = associate(scp.port)
    sent = [f"1.2.826.0.1.3680043.9.0604688119.{index:02d}" for index in range(3)]
    sent.append("1.2.826.0.1.3680043.9.0604688119." + "7" * 31)  # 64 characters
    for index, sop in enumerate(sent):
        ds = ct_slice(study, series, index, sop_uid=sop)
        if index == 3:  # padded beyond 64 bytes in the dataset: NULs and a space
            ds.SOPInstanceUID = sop + "\x00 \x00"
        assert send_raw(assoc, sop, dataset_bytes(ds), msg_id=index + 1) == 0x0000
    assoc.release()
    with db.session() as s:
        rows = s.scalars(select(Instance.sop_uid)).all()
    assert sorted(rows) == sorted(sent)
    warned = _events(db, "uid_not_conformant")
    assert len(warned) == 1 and "leading zero" in warned[0].message  # once per series
    files = sorted(p.name for p in scp.spool.root.rglob("*.dcm"))
    assert files == [f"{sop}.dcm" for sop in sorted(rows)]


def test_one_sop_uid_in_two_series_is_kept_twice_and_reported(scp, db):
    study = generate_uid()
    first, second = generate_uid(), generate_uid()
    assoc = associate(scp.port)
    sops = [generate_uid() for _ in range(2)]
    for number, series in enumerate((first, second)):
        for index, sop in enumerate(sops):
            ds = ct_slice(study, series, index, sop_uid=sop, seed=number * 10)
            assert send_raw(assoc, sop, dataset_bytes(ds), msg_id=number * 2 + index + 1) == 0
    assoc.release()
    with db.session() as s:
        rows = s.execute(select(Series.series_uid, Instance.sop_uid, Instance.path).join(Series))
        by_series: dict[str, list[tuple[str, str]]] = {}
        for series_uid, sop, path in rows:
            by_series.setdefault(series_uid, []).append((sop, path))
    assert set(by_series) == {first, second}
    for series_uid, items in by_series.items():
        assert sorted(sop for sop, _ in items) == sorted(sops)
        assert all(f"/{series_uid}/" in path for _, path in items)
    assert len({path for items in by_series.values() for _, path in items}) == 4
    reported = _events(db, "duplicate_sop_uid")
    assert len(reported) == 1 and first in reported[0].message


def test_a_series_uid_reused_by_another_study_is_refused_and_reported(scp, db):
    series = generate_uid()
    assoc = associate(scp.port)
    ok = ct_slice(generate_uid(), series, 0)
    assert send_raw(assoc, ok.SOPInstanceUID, dataset_bytes(ok), msg_id=1) == 0
    other_study = generate_uid()
    clash = ct_slice(other_study, series, 1)
    status = send_raw(assoc, clash.SOPInstanceUID, dataset_bytes(clash), msg_id=2)
    assoc.release()
    assert status == 0xC000
    assert not list(scp.spool.root.glob(f"{other_study}/*/*.dcm"))  # nothing half-stored
    conflict = _events(db, "series_uid_conflict")
    assert len(conflict) == 1 and other_study in conflict[0].message
