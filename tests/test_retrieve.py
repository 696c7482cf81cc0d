"""Pull on demand: studies placed in a real Orthanc (DICOMweb plugin loaded, the node
registered in its DicomModalities) are retrieved on request by C-MOVE, C-GET and
WADO-RS, enter by the receive path, and are routed with the pipelines the request names
(or the rules' choice). Bad requests get a clear answer and store nothing.

One node (worker off: no model runs here; the jobs routing queues are the outcome) and one
Orthanc for the module; tiny studies (64 x 64 x 12).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy import select

from db.models import AuditRecord, Event, Instance, Job, RetrieveRequest, Series, Study
from devkit.net import free_port
from devkit.orthanc import OrthancServer
from devkit.synth import generate_study
from dicom_node import retrieve, sources
from dicom_node.service import Node
from kernel.vocabulary import EventKind, RetrieveState
from tests.conftest import node_settings, wait_until
from tests.web_helpers import client_for, make_users

SMALL = {"rows": 64, "columns": 64, "pixel_spacing_mm": 6.0, "slices": 12}
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# name -> (seed, patient ID); the twins share a patient ID (and study date).
STUDIES = {
    "move": (41, "P-MOVE"),
    "get": (42, "P-GET"),
    "web": (43, "P-WEB"),
    "twin1": (44, "P-TWIN"),
    "twin2": (45, "P-TWIN"),
    "refused": (46, "P-REFUSED"),
}


def dicomweb_orthanc(workdir: Path, node_ae: str, node_port: int, **kwargs: Any) -> OrthancServer:
    """Orthanc with its DICOMweb plugin (Debian package orthanc-dicomweb) at /dicom-web/,
    accepting only the node (C-FIND, C-MOVE, C-GET, C-STORE from its AE title and host)."""
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing: install the Debian package orthanc-dicomweb")
    return OrthancServer(
        workdir,
        accept_unknown_peers=False,
        modalities={"node": (node_ae, "127.0.0.1", node_port)},
        extra_config={"Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True}},
        **kwargs,
    ).start()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("retrieve")
    node_port = free_port()
    pacs = dicomweb_orthanc(tmp / "orthanc", "DICOM_NODE", node_port)
    studies = {}
    for name, (seed, patient_id) in STUDIES.items():
        study = generate_study(tmp / name, seed=seed, phases="P", patient_id=patient_id, **SMALL)
        for path in study.series[0].files:
            pacs.upload(path.read_bytes())
        studies[name] = study
    dimse = {"kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
    sources = [
        {**dimse, "name": "pacs"},
        {**dimse, "name": "pacs-get", "retrieve": "get"},
        {**dimse, "name": "pacs-unregistered", "move_destination": "NOT_REGISTERED"},
        {"kind": "dicomweb", "name": "web", "url": f"{pacs.url}/dicom-web"},
    ]
    settings = node_settings(tmp, port=node_port, worker={"enabled": False}, sources=sources)
    node = Node(settings, stop_grace_s=10).start()
    try:
        token = make_users(node)
        from dicom_node.web.users import add_user, create_token

        add_user(node.db, "vic-op", "correct horse battery", "viewer")
        viewer = create_token(node.db, "vic-op", "tests")
        config = tmp / "node.yaml"
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
        yield {
            "node": node,
            "pacs": pacs,
            "studies": studies,
            "admin": {"Authorization": f"Bearer {token}"},
            "viewer": {"Authorization": f"Bearer {viewer}"},
            "config": config,
        }
    finally:
        node.stop()
        pacs.stop(graceful=False)  # its storage is thrown away


def _accession(study: Any) -> str:
    return str(pydicom.dcmread(study.series[0].files[0]).AccessionNumber)


def _ask(site: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = client_for(site["node"]).post("/api/retrievals", json=body, headers=site["admin"])
    assert r.status_code == 202, r.text
    return r.json()


def _request(site: dict[str, Any], request_id: int) -> dict[str, Any]:
    r = client_for(site["node"]).get(f"/api/retrievals/{request_id}", headers=site["admin"])
    assert r.status_code == 200, r.text
    return r.json()


def _done(site: dict[str, Any], request_id: int, timeout_s: float = 30) -> dict[str, Any]:
    return wait_until(
        lambda: (row := _request(site, request_id))["state"] in ("received", "failed") and row,
        timeout_s,
        f"retrieve #{request_id} to end",
    )


def _routed(node: Node, study_uid: str) -> list[Event]:
    with node.db.session() as s:
        return list(
            s.scalars(
                select(Event).where(Event.study_uid == study_uid, Event.kind == EventKind.ROUTED)
            )
        )


def _jobs(node: Node, study_uid: str) -> list[Job]:
    with node.db.session() as s:
        return list(
            s.scalars(select(Job).join(Study).where(Study.study_uid == study_uid).order_by(Job.id))
        )


def test_move_by_accession_runs_only_the_named_pipeline(site):
    node, study = site["node"], site["studies"]["move"]
    asked = _ask(site, source="pacs", accession_number=_accession(study), pipelines=["tumor"])
    row = _done(site, asked["id"])
    assert row["state"] == "received", row
    assert row["method"] == "C-MOVE" and row["study_uid"] == study.study_uid
    assert (row["instances_expected"], row["instances_received"], row["instances_failed"]) == (
        12,
        12,
        0,
    )
    # The instances came through the listener (the C-MOVE's own association from Orthanc).
    series_uid = study.series[0].series_uid
    with node.db.session() as s:
        series = s.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        assert (series.instance_count, series.calling_ae) == (12, "ORTHANC")
    routed = wait_until(lambda: _routed(node, study.study_uid), 30, "the series routed")
    assert routed[-1].data["pipelines"] == ["tumor"]
    assert f"retrieve request #{asked['id']} names pipelines tumor" in routed[-1].message
    jobs = wait_until(lambda: _jobs(node, study.study_uid), 15, "the tumor job queued")
    assert [(j.pipeline, j.inputs) for j in jobs] == [("tumor", {"image": series_uid})]
    # The study page shows the retrieval and its progress.
    detail = client_for(node).get(f"/api/studies/{study.study_uid}", headers=site["admin"])
    assert detail.json()["retrievals"][0]["instances_received"] == 12


def test_get_from_the_cli_by_study_uid_leaves_the_choice_to_the_rules(site):
    node, study = site["node"], site["studies"]["get"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "-c",
            str(site["config"]),
            "retrieve",
            "--source",
            "pacs-get",
            "--study-uid",
            study.study_uid,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"study {study.study_uid} received" in done.stdout
    assert "received: 12 / 12 instances" in done.stdout
    with node.db.session() as s:
        row = s.scalars(
            select(RetrieveRequest).where(RetrieveRequest.study_uid == study.study_uid)
        ).one()
        assert (row.method, row.requested_by[:4], row.pipelines) == ("C-GET", "cli:", None)
        # Stored by the receive path: one spool file per instance, recorded with the source.
        paths = s.scalars(
            select(Instance.path)
            .join(Series)
            .where(Series.series_uid == study.series[0].series_uid)
        ).all()
        assert len(paths) == 12 and all(Path(p).is_file() for p in paths)
        assert (
            s.scalars(
                select(Series.calling_ae).where(Series.series_uid == study.series[0].series_uid)
            ).one()
            == "ORTHANC"
        )
    routed = wait_until(lambda: _routed(node, study.study_uid), 30, "the series routed")
    assert "retrieve request" not in routed[-1].message  # the rules decided
    # The shipped rule asks for tumor, vessel and ureter; a portal venous series alone
    # feeds tumor, the others wait for their phases.
    assert routed[-1].data["pipelines"] == ["tumor", "vessel", "ureter"]
    jobs = wait_until(lambda: _jobs(node, study.study_uid), 15, "the tumor job queued")
    assert [j.pipeline for j in jobs] == ["tumor"]


def test_dicomweb_by_patient_id_and_date_keeps_the_pacs_bytes(site):
    node, pacs, study = site["node"], site["pacs"], site["studies"]["web"]
    asked = _ask(site, source="web", patient_id="P-WEB", date_from="2024-03-01", date_to="20240331")
    row = _done(site, asked["id"])
    assert (row["state"], row["method"], row["instances_received"]) == ("received", "WADO-RS", 12)
    with node.db.session() as s:
        stored = {
            i.sop_uid: i.path
            for i in s.scalars(
                select(Instance).join(Series).where(Series.series_uid == study.series[0].series_uid)
            )
        }
    assert len(stored) == 12
    sop_uid, path = sorted(stored.items())[0]
    ours = pydicom.dcmread(path)
    theirs = pydicom.dcmread(
        __import__("io").BytesIO(pacs.instance_file(pacs.find_instance(sop_uid)))
    )
    assert ours.PixelData == theirs.PixelData
    assert ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
    assert ours.ImagePositionPatient == theirs.ImagePositionPatient


def test_bad_requests_get_a_clear_answer_and_store_nothing(site):
    node, client, admin = site["node"], client_for(site["node"]), site["admin"]
    r = client.post(
        "/api/retrievals", json={"source": "nope", "accession_number": "A1"}, headers=admin
    )
    assert r.status_code == 404
    assert r.json()["detail"] == (
        "unknown source 'nope' (sources: pacs, pacs-get, pacs-unregistered, web)"
    )
    r = client.post(
        "/api/retrievals",
        headers=admin,
        json={"source": "pacs", "accession_number": "A1", "pipelines": ["kidneyz"]},
    )
    assert r.status_code == 422 and "unknown pipeline 'kidneyz'" in r.json()["detail"]
    r = client.post("/api/retrievals", json={"source": "pacs"}, headers=admin)
    assert r.status_code == 422 and "exactly one of" in r.json()["detail"]
    r = client.post(
        "/api/retrievals", json={"source": "pacs", "accession_number": "A*"}, headers=admin
    )
    assert r.status_code == 422 and "cannot match exactly" in r.json()["detail"]

    missing = _done(site, _ask(site, source="pacs", accession_number="NOPE")["id"])
    assert missing["state"] == "failed"
    assert missing["reason"] == "accession NOPE not found at source pacs"

    twins = _done(site, _ask(site, source="pacs", patient_id="P-TWIN")["id"])
    assert twins["state"] == "failed"
    assert "the patient ID matches 2 studies at source pacs" in twins["reason"]
    assert "ask for one by its Study Instance UID" in twins["reason"]

    refused_study = site["studies"]["refused"]
    refused = _done(
        site, _ask(site, source="pacs-unregistered", study_uid=refused_study.study_uid)["id"]
    )
    assert refused["state"] == "failed"
    # Orthanc answers an unknown move destination with 0xC000 (its log: "Unknown modality
    # for AET"), not 0xA801: the reason says what to check either way.
    assert "refused the C-MOVE: unable to process (0xC000)" in refused["reason"]
    assert (
        "if it does not know the move destination NOT_REGISTERED: register this node at the "
        f"source as AE title NOT_REGISTERED with this machine's address, DICOM port "
        f"{node.settings.port}" in refused["reason"]
    )
    assert refused["instances_received"] == 0
    with node.db.session() as s:
        for uid in (refused_study.study_uid, site["studies"]["twin1"].study_uid):
            assert s.scalars(select(Study).where(Study.study_uid == uid)).first() is None
    assert not (node.settings.spool_dir / refused_study.study_uid).exists()
    # The CLI says the same before it writes anything.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "-c",
            str(site["config"]),
            "retrieve",
            "--source",
            "nope",
            "--accession",
            "A1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown source 'nope'" in done.stderr


def test_searching_a_source_is_for_operators_and_audited_with_the_patient_id(site):
    node, client = site["node"], client_for(site["node"])
    r = client.get("/api/sources/web/studies?patient_id=P-TWIN", headers=site["admin"])
    assert r.status_code == 200, r.text
    found = r.json()["studies"]
    assert {x["study_uid"] for x in found} == {
        site["studies"]["twin1"].study_uid,
        site["studies"]["twin2"].study_uid,
    }
    assert all(x["patient_id"] == "P-TWIN" and x["instance_count"] == 12 for x in found)
    r = client.get("/api/sources/pacs/studies?patient_id=P-TWIN", headers=site["viewer"])
    assert r.status_code == 403
    listed = client.get("/api/sources", headers=site["viewer"]).json()["sources"]
    assert [x["name"] for x in listed] == ["pacs", "pacs-get", "pacs-unregistered", "web"]
    with node.db.session() as s:
        record = s.scalars(
            select(AuditRecord)
            .where(AuditRecord.action == "source_searched")
            .order_by(AuditRecord.id.desc())
        ).first()
        assert (record.actor, record.patient_id, record.object_id) == ("ada", "P-TWIN", "web")
        assert record.detail["found"] == 2


def test_a_request_interrupted_by_a_stop_is_asked_again(db):
    request_id = retrieve.create(
        db, "pacs", retrieve.parse_query(accession_number="A7"), ["tumor"], "ada"
    )
    claimed = retrieve.claim_next(db)
    assert (claimed.id, claimed.state, claimed.attempts) == (request_id, "querying", 1)
    assert retrieve.claim_next(db) is None  # one claimant only
    assert retrieve.requeue_interrupted(db) == 1
    with db.session() as s:
        assert s.get(RetrieveRequest, request_id).state == RetrieveState.REQUESTED
        named = retrieve.named_pipelines(s, "1.2.3")
    assert named is None


def test_only_a_retrieval_that_began_names_the_pipelines_of_its_study(db):
    uid = "1.2.826.0.1.3680043.10.543.1"
    failed = retrieve.create(db, "pacs", retrieve.parse_query(study_uid=uid), ["tumor"], "ada")
    retrieve.claim_next(db)
    retrieve.fail(db, failed, "source pacs: no association")
    with db.session() as s:
        assert retrieve.named_pipelines(s, uid) is None  # nothing came of it
    began = retrieve.create(db, "pacs", retrieve.parse_query(study_uid=uid), ["vessel"], "ada")
    retrieve.claim_next(db)
    retrieve.start_retrieving(
        db, began, study_uid=uid, method="C-MOVE", expected=3, detail={}, message="moving"
    )
    with db.session() as s:
        named = retrieve.named_pipelines(s, uid)
    assert (named.request_id, named.pipelines) == (began, ("vessel",))
    assert named.describe() == (
        f"retrieve request #{began} names pipelines vessel (instead of the rules' choice)"
    )


def test_source_credentials_are_never_shown(tmp_path):
    from dicom_node.web.admin_api import settings_view
    from kernel.settings import load_settings

    settings = load_settings(
        None,
        data_dir=tmp_path,
        sources=[
            {
                "kind": "dicomweb",
                "name": "vna",
                "url": "https://vna.example/dicom-web/",
                "auth": {"type": "basic", "username": "node", "password": "s3cret-pw"},
            },
            {
                "kind": "dicomweb",
                "name": "cloud",
                "url": "https://cloud.example/dicomweb",
                "auth": {"type": "bearer", "token": "tok-123"},
            },
        ],
    )
    shown = str(settings_view(settings)) + str([sources.source_dict(x) for x in settings.sources])
    assert "s3cret-pw" not in shown and "tok-123" not in shown
    assert settings.source("vna").url == "https://vna.example/dicom-web"  # no trailing /
