"""DICOM TLS (issue 16) with real peers: DCMTK storescu / echoscu / storescp with
``+tls`` and Orthanc with ``DicomTlsEnabled``, certificates made by ``openssl`` in the
test (``tests/tls_helpers.py``).

The listener serves plain DICOM and DICOM TLS (client certificate required) side by
side; ``peers`` admits CT1's certificate from any AE title, the PACS's certificate for
AE PACS, and AE PLAIN_SCU over plain DICOM. Each test checks what the peer saw (exit
status, the reason DCMTK prints), what the node stored, and the reason in the node's log
or on the destination's health.
"""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Dispatch, Instance
from db.session import Database
from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port, wait_for_port
from devkit.orthanc import OrthancServer
from dicom_node.assembler import AssociationTracker
from dicom_node.dispatch import DestinationSender, Dispatcher
from dicom_node.echo import check
from dicom_node.health import destination_health, echo_destination
from dicom_node.scp import AssociationFacts, StorageSCP
from dicom_node.spool import Spool
from dicom_node.tls import TlsSetupError
from kernel.settings import (
    ConfigError,
    Destination,
    DestinationTls,
    DispatchSettings,
    load_settings,
)
from tests.conftest import node_settings, storescu, wait_until
from tests.dicom_factory import ct_series, ct_slice, write
from tests.tls_helpers import Pki, make_pki


class TlsNode:
    """A listener with a plain and a TLS port, on SQLite, and what it reported."""

    def __init__(self, folder: Path, pki: Pki, **overrides: object) -> None:
        url = f"sqlite:///{folder / 'node.db'}"
        upgrade(url)
        self.db = Database(url)
        self.closed: list[AssociationFacts] = []
        base: dict[str, object] = dict(
            tls={
                "enabled": True,
                "port": free_port(),
                "certificate": pki.node.cert,
                "private_key": pki.node.key,
                "ca_bundle": pki.ca,
                "client_certificate": "required",
            },
            peers=[
                {"ae_title": "*", "host": "127.0.0.1", "certificate_subject": "CN=CT1"},
                {
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "certificate_subject": "CN=pacs, O=Test Hospital",
                },
                {"ae_title": "PLAIN_SCU", "host": "127.0.0.1"},
            ],
        )
        base.update(overrides)
        self.settings = node_settings(folder, **base)
        self.scp = StorageSCP(
            self.settings,
            self.db,
            Spool(self.settings.spool_dir, 0),
            AssociationTracker(),
            on_closed=self.closed.append,
        )
        self.scp.start()

    def instances(self, sop_uids: list[str]) -> int:
        with self.db.session() as s:
            return s.scalar(
                select(func.count()).select_from(Instance).where(Instance.sop_uid.in_(sop_uids))
            )

    def stop(self) -> None:
        self.scp.stop()
        self.db.dispose()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(tmp_path_factory, pki) -> Iterator[TlsNode]:
    server = TlsNode(tmp_path_factory.mktemp("node"), pki)
    yield server
    server.stop()


def _tool(name: str) -> str:
    exe = dcmtk_tool(name)
    if exe is None:
        pytest.fail(f"DCMTK {name} is not installed (apt-get install dcmtk)")
    return exe


def sop_uids(files: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def tls_client(pki: Pki, who: str) -> list[str]:
    """DCMTK options for a TLS client presenting ``who``'s certificate (``none``: none)."""
    if who == "none":
        return ["+tla", "+cf", str(pki.ca)]
    pair = getattr(pki, who)
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca)]


def test_storescu_and_echoscu_over_tls_with_a_trusted_certificate(node, pki, tmp_path):
    files = ct_series(tmp_path / "ct1", n=3)

    sent = storescu(files, node.scp.tls_port, "DICOM_NODE", "CT_SCANNER", *tls_client(pki, "ct1"))
    echo = subprocess.run(
        [_tool("echoscu"), *tls_client(pki, "ct1"), "-aec", "DICOM_NODE"]
        + ["127.0.0.1", str(node.scp.tls_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert sent.returncode == 0, sent.stderr
    assert echo.returncode == 0, echo.stderr
    assert node.instances(sop_uids(files)) == 3
    wait_until(lambda: any(f.instances_stored == 3 for f in node.closed), 5, "the facts")
    facts = next(f for f in node.closed if f.instances_stored == 3)
    assert (facts.transport, facts.tls_subject) == ("TLS", "CN=CT1, O=Test Hospital")
    assert (facts.calling_ae, facts.outcome, facts.ended) == ("CT_SCANNER", "accepted", "released")


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("none", "a client certificate is required and none was sent"),
        ("untrusted", "certificate verify failed: unable to get local issuer certificate"),
        ("expired", "certificate verify failed: certificate has expired"),
        ("plain", "the peer does not speak TLS here"),
    ],
)
def test_client_without_a_trusted_certificate_is_refused(
    node, pki, tmp_path, caplog, client, reason
):
    caplog.set_level(logging.WARNING, logger="dicom_node.listener")
    files = ct_series(tmp_path / client, n=1)
    options = [] if client == "plain" else tls_client(pki, client)

    sent = storescu(files, node.scp.tls_port, "DICOM_NODE", "CT_SCANNER", *options)

    assert sent.returncode != 0
    assert node.instances(sop_uids(files)) == 0

    # With TLS 1.3 the client may learn of the refusal before the listener's thread logs it.
    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]

    wait_until(refusals, 5, "the listener's log line")
    assert reason in refusals()[-1], refusals()
    assert refusals()[-1].startswith("refused the DICOM TLS connection from 127.0.0.1:")


def test_peers_admit_by_certificate_subject_and_transport(node, pki, tmp_path, caplog):
    files = ct_series(tmp_path / "subjects", n=1)

    ct2 = storescu(files, node.scp.tls_port, "DICOM_NODE", "CT_SCANNER", *tls_client(pki, "ct2"))
    ct1_plain = storescu(files, node.scp.port, "DICOM_NODE", "CT_SCANNER")
    plain_scu = storescu(files, node.scp.port, "DICOM_NODE", "PLAIN_SCU")

    # A trusted certificate whose subject no peers entry names: A-ASSOCIATE-RJ, reason 3.
    assert ct2.returncode != 0 and "Calling AE Title Not Recognized" in ct2.stderr
    assert "client certificate subject CN=CT2, O=Test Hospital does not match" in caplog.text
    # Entries with a certificate subject admit over TLS only.
    assert ct1_plain.returncode != 0 and "Calling AE Title Not Recognized" in ct1_plain.stderr
    assert plain_scu.returncode == 0, plain_scu.stderr
    wait_until(lambda: any(f.calling_ae == "PLAIN_SCU" for f in node.closed), 5, "the facts")
    plain = next(f for f in node.closed if f.calling_ae == "PLAIN_SCU")
    assert (plain.transport, plain.tls_subject, plain.instances_stored) == ("plain", None, 1)


def test_silent_client_on_the_tls_port_blocks_nobody(node, pki, tmp_path):
    files = ct_series(tmp_path / "behind", n=1)
    with socket.create_connection(("127.0.0.1", node.scp.tls_port)):  # never says hello
        sent = storescu(
            files, node.scp.tls_port, "DICOM_NODE", "CT_SCANNER", *tls_client(pki, "ct1")
        )
    assert sent.returncode == 0, sent.stderr


def test_orthanc_stores_over_tls_and_results_go_back_over_tls(node, pki, tmp_path):
    """Orthanc (DicomTlsEnabled, remote certificate required) sends a study to the node's
    TLS port; the dispatcher sends a result and C-ECHOes back to Orthanc's TLS port."""
    orthanc = OrthancServer(
        tmp_path / "orthanc",
        aet="PACS",
        throwaway=True,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.pacs.cert),
            "DicomTlsPrivateKey": str(pki.pacs.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": {
                "node": {
                    "AET": "DICOM_NODE",
                    "Host": "127.0.0.1",
                    "Port": node.scp.tls_port,
                    "UseDicomTls": True,
                }
            },
        },
    )
    study = generate_uid()
    incoming = ct_slice(study, generate_uid(), 0)
    result = ct_slice(study, generate_uid(), 0)
    dest = Destination(
        name="pacs",
        ae_title="PACS",
        host="127.0.0.1",
        port=1,  # set below, once Orthanc has its port
        tls=DestinationTls(ca_bundle=pki.ca, certificate=pki.node.cert, private_key=pki.node.key),
    )
    with orthanc:
        dest = dest.model_copy(update={"port": orthanc.dicom_port})
        # Orthanc -> node over TLS, Orthanc presenting the PACS certificate.
        orthanc_id = orthanc.upload(write(incoming, tmp_path / "in.dcm").read_bytes())
        orthanc.rest("POST", "/modalities/node/store", json={"Resources": [orthanc_id]})
        assert node.instances([incoming.SOPInstanceUID]) == 1
        facts = next(f for f in node.closed if f.calling_ae == "PACS")
        assert facts.tls_subject == "CN=pacs, O=Test Hospital"

        # node -> Orthanc over TLS: a result through the outbox, and a C-ECHO.
        _queue(node.db, result, tmp_path / "result.dcm")
        dispatcher = Dispatcher(
            node.db, {"pacs": dest}, DispatchSettings(timeout_s=10), "DICOM_NODE"
        )
        assert dispatcher.poll() == 1
        orthanc.wait_for_instance(result.SOPInstanceUID, timeout_s=10)
        with node.db.session() as s:
            assert s.scalars(select(Dispatch.state)).all() == ["sent"]
        # Over TLS pynetdicom's DUL thread alone uses the SSL object (no FileStore), and
        # the socket has the dispatch timeout (a destination that stops reading).
        assoc, why, _ = DestinationSender(dispatcher, dest, 0)._associate(
            {(str(result.SOPClassUID), str(result.file_meta.TransferSyntaxUID))}
        )
        assert assoc is not None, why
        try:
            assert assoc.file_store is None
            assert assoc.dul.socket.socket.gettimeout() == 10
        finally:
            assoc.release()
        answer = check("127.0.0.1", orthanc.dicom_port, "PACS", "DICOM_NODE", 5, dest.tls)
        assert answer.ok, answer.detail
        # Without a client certificate Orthanc refuses, and the answer says so.
        bare = DestinationTls(ca_bundle=pki.ca)
        answer = check("127.0.0.1", orthanc.dicom_port, "PACS", "DICOM_NODE", 5, bare)
        assert not answer.ok
        assert f"TLS with 127.0.0.1:{orthanc.dicom_port} failed" in answer.detail
        assert "requires a client certificate" in answer.detail


def _queue(db: Database, ds: pydicom.Dataset, path: Path, destination: str = "pacs") -> None:
    write(ds, path)
    with db.session() as s:
        s.add(
            Dispatch(
                kind="result",
                sop_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                path=str(path),
                destination=destination,
            )
        )


def test_expired_destination_certificate_is_reported_on_its_health(pki, tmp_path):
    """A storescp +tls whose certificate expired: the send is retried with the reason,
    the C-ECHO answer says it, and so does the destination's health (destinations page,
    /healthz)."""
    port = free_port()
    storescp = subprocess.Popen(
        [_tool("storescp"), "+tls", str(pki.expired.key), str(pki.expired.cert)]
        + ["+cf", str(pki.ca), "-od", str(tmp_path), "-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    db = Database(url)
    tls = {"ca_bundle": pki.ca, "certificate": pki.node.cert, "private_key": pki.node.key}
    settings = node_settings(
        tmp_path,
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, "tls": tls}
        ],
    )
    try:
        wait_for_port("127.0.0.1", port, 10)
        expected = (
            f"TLS with 127.0.0.1:{port} failed: certificate verify failed: certificate has expired"
        )
        _queue(db, ct_slice(generate_uid(), generate_uid(), 0), tmp_path / "r.dcm")
        dispatcher = Dispatcher(
            db, {"pacs": settings.destinations[0]}, settings.dispatch, "DICOM_NODE"
        )
        assert dispatcher.poll() == 1
        with db.session() as s:
            row = s.scalars(select(Dispatch)).one()
            assert (row.state, row.last_error) == ("pending", expected)

        answer = echo_destination(db, settings, "pacs", "manual", "ada")

        assert not answer.ok and answer.detail == expected
        with db.session() as s:
            health = destination_health(s, settings)["pacs"]
        assert str(health.state) == "unreachable"
        assert expected in health.reason
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
        db.dispose()


def test_tls_only_listener_and_settings_errors(pki, tmp_path):
    node = TlsNode(tmp_path / "only", pki, tls={
        "enabled": True, "port": free_port(), "serve_plain": False,
        "certificate": pki.node.cert, "private_key": pki.node.key, "ca_bundle": pki.ca,
    })  # fmt: skip
    try:
        assert node.scp.address("plain") is None
        assert node.scp.port == node.scp.tls_port
    finally:
        node.stop()

    # Incomplete or unusable TLS files are named at start.
    with pytest.raises(ConfigError, match="tls: enabled TLS needs private_key, ca_bundle"):
        load_settings(None, tls={"enabled": True, "certificate": str(pki.node.cert)})
    with pytest.raises(ConfigError, match="tls.ca_bundle: .*does not exist"):
        load_settings(None, tls={"ca_bundle": str(tmp_path / "missing.pem")})
    mismatched = node_settings(tmp_path / "bad", tls={
        "enabled": True, "certificate": pki.node.cert, "private_key": pki.ct1.key,
        "ca_bundle": pki.ca, "port": free_port(),
    })  # fmt: skip
    with pytest.raises(TlsSetupError, match="tls: cannot use certificate .*does not belong"):
        StorageSCP(mismatched, None, None, None)
    with pytest.raises(TlsSetupError, match=r"destinations\.pacs\.tls: cannot use certificate"):
        bad_client = DestinationTls(
            ca_bundle=pki.ca, certificate=pki.ct1.cert, private_key=pki.node.key
        )
        dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1, tls=bad_client)
        Dispatcher(None, {"pacs": dest}, DispatchSettings(), "DICOM_NODE")
    # Relative paths in the settings file are relative to the file.
    (tmp_path / "certs").mkdir()
    for name, source in (("node.pem", pki.node.cert), ("node.key", pki.node.key)):
        (tmp_path / "certs" / name).write_bytes(source.read_bytes())
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        "tls: {enabled: true, certificate: certs/node.pem, private_key: certs/node.key, "
        "client_certificate: none}\n"
    )
    assert load_settings(cfg).tls.certificate == tmp_path / "certs" / "node.pem"
