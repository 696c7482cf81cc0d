"""Korean studies through the whole node (issue 13, kind 1), on real components.

DCMTK storescu -> node (receive, database, phase classification, the shipped tumour model,
SEG writer, C-STORE) -> a real Orthanc. Two small studies: one in ``\\ISO 2022 IR 149``
with escape sequences as PS3.5 Annex I writes them, whose SEG must keep that set; one
labelled ``GB2312`` (which pydicom cannot write back), whose SEG must be transcoded to
ISO_IR 192 and say so in the job summary and the event log. The SEGs are fetched back from
Orthanc and read both by pydicom and by Orthanc itself.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from db.models import Dispatch, Event, Job, Series, Study
from devkit.synth import generate_study
from tests.conftest import storescu, wait_until
from tests.test_charsets import (
    CHINESE,
    KOREAN,
    KR,
    KR_ESCAPE,
    Variant,
    encoded_texts,
    g1_escaped,
    plain,
    recode,
)

pytestmark = pytest.mark.slow

KOREAN_STUDY = Variant("korean", KR, KOREAN, g1_escaped(KR_ESCAPE, "euc_kr"), KR)
CHINESE_STUDY = Variant("gb2312", "GB2312", CHINESE, plain("gb2312"), "ISO_IR 192", True)


def _study(folder: Path, seed: int, variant: Variant) -> list[Path]:
    """A small portal-venous series the shipped tumour model still segments, re-encoded."""
    study = generate_study(
        folder / "generated", seed=seed, phases="P", rows=96, columns=96, pixel_spacing_mm=4.0
    )
    return recode(study.series[0].files, folder / "sent", variant.declared, encoded_texts(variant))


def _same_name(got: object, expected: str) -> bool:
    return str(got).rstrip("=") == expected.rstrip("=")


def test_korean_and_chinese_studies_come_back_with_their_text(tmp_path, orthanc, start_node):
    node = start_node(
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            },
        ]  # fmt: skip
    )
    sent = {
        KOREAN_STUDY.id: (KOREAN_STUDY, _study(tmp_path / "kr", 41, KOREAN_STUDY)),
        CHINESE_STUDY.id: (CHINESE_STUDY, _study(tmp_path / "cn", 42, CHINESE_STUDY)),
    }
    for _, files in sent.values():
        proc = storescu(files, node.settings.port)
        assert proc.returncode == 0, proc.stderr

    def sent_segs() -> dict[str, str] | None:
        with node.db.session() as s:
            rows = s.scalars(select(Dispatch).where(Dispatch.state == "sent")).all()
            return {r.sop_uid: r.path for r in rows} if len(rows) == 2 else None

    wait_until(sent_segs, 240, "both SEGs sent to Orthanc")

    for variant, files in sent.values():
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        study_uid, series_uid = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
        with node.db.session() as s:
            # Database (and so the web pages): decoded text.
            study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            assert _same_name(study.patient_name, variant.texts["PatientName"])
            assert study.study_description == variant.texts["StudyDescription"]
            series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
            assert series.series_description == variant.texts["SeriesDescription"]
            # Phase from the decoded description.
            assert series.phase == "P"
            keyword = "문맥" if variant is KOREAN_STUDY else "portal"
            assert any(f"contains {keyword!r} (P)" in r for r in series.phase_reasons)
            job = s.scalars(select(Job).where(Job.study_id == study.id)).one()
            assert job.state == "done", job.last_error
            (seg_summary,) = job.summary["segs"]
            sop_uid = seg_summary["sop_uid"]
            events = s.scalars(
                select(Event).where(Event.study_uid == study_uid, Event.kind == "result_transcoded")
            ).all()
            if variant.transcoded:
                assert "ISO_IR 192" in seg_summary["transcoded"]
                (event,) = events
                assert sop_uid in event.message and "ISO_IR 192" in event.message
                assert event.level == "warning"
            else:
                assert "transcoded" not in seg_summary and not events

        # The SEG as the PACS stores it.
        instance_id = orthanc.find_instance(sop_uid)
        seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance_id)))
        assert seg.Modality == "SEG"
        written = seg.SpecificCharacterSet
        assert (written if isinstance(written, str) else list(written)) == variant.written
        for keyword in ("PatientName", "ReferringPhysicianName", "StudyDescription"):
            assert _same_name(seg.get(keyword), variant.texts[keyword]), keyword
        assert seg.StudyInstanceUID == study_uid
        # ... and as Orthanc itself decodes it.
        tags = orthanc.get_json(f"/instances/{instance_id}/simplified-tags")
        assert _same_name(tags["PatientName"], variant.texts["PatientName"])
        assert tags["StudyDescription"] == variant.texts["StudyDescription"]
