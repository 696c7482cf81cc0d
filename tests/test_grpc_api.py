"""The path API over gRPC (issue 19) on running nodes, with a real grpcio client over
127.0.0.1: the same mask as the HTTP path API for the same input, a job's status stream,
the same roles, path checks (one refusal inside and outside the roots, whether a path
exists or not), audit records and messages as the HTTP API, TLS with the node's
certificate, and the generated code in step with its .proto."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from google.protobuf import descriptor_pb2
from sqlalchemy import func, select

from db.models import Job
from devkit.net import free_port
from devkit.synth import generate_study
from dicom_node import path_requests
from dicom_node.grpc_api import path_inference_pb2 as pb2
from dicom_node.grpc_api import path_inference_pb2_grpc as pb2_grpc
from dicom_node.grpc_api.server import (
    GRPC_CODE,
    SERVICE,
    GrpcServer,
    GrpcSetupError,
    peer_address,
)
from dicom_node.path_requests import Problem
from dicom_node.web import create_app
from dicom_node.web.auth import require_operator
from dicom_node.web.inference_api import HTTP_STATUS
from inference import queue
from inference.nifti_io import read_nifti
from kernel.settings import REPO_ROOT, ConfigError, load_settings
from tests.security_helpers import audit_rows, role_users, running_node
from tests.web_helpers import make_users

SHIPPED = {"models_file": REPO_ROOT / "models.yaml", "rules_file": REPO_ROOT / "routing_rules.yaml"}
PROTO = REPO_ROOT / "dicom_node" / "grpc_api" / "path_inference.proto"


def _bearer(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata from an HTTP Authorization header (the same token)."""
    return (("authorization", headers["Authorization"]),)


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if not hasattr(result, "job_id"):  # a stream: read it to get its status
            list(result)
    return err.value.code(), err.value.details()


# -- the model runs: the same mask as HTTP, a status stream that ends in done ----------


def test_grpc_tumor_gives_the_http_mask_and_its_status_stream_ends_in_done(
    tmp_path: Path, start_node
) -> None:
    grpc_port = free_port()
    # The shipped rules, with the tumour pipeline also writing its probability NIfTI.
    rules = yaml.safe_load(SHIPPED["rules_file"].read_text(encoding="utf-8"))
    rules["pipelines"]["tumor"]["probabilities"] = ["nifti"]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    node = start_node(
        rules_file=rules_file,
        path_api={"allowed_roots": [tmp_path]},
        grpc={"enabled": True, "host": "127.0.0.1", "port": grpc_port},
    )
    assert node.grpc_port == grpc_port
    token = make_users(node)  # ada (admin)
    auth = (("authorization", f"Bearer {token}"),)
    study = generate_study(tmp_path / "study", seed=11, phases="P", rows=96, columns=96,
                           pixel_spacing_mm=4.0)  # fmt: skip
    folder = str(study.series[0].files[0].parent)

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb2_grpc.PathInferenceStub(channel)
        # Queued at once, then watched: every state change until it ends in done.
        queued = stub.Tumor(pb2.TumorRequest(image_path=folder, wait_s=0), metadata=auth)
        assert queued.state in ("queued", "running") and queued.mask_path == ""
        stream = list(stub.WatchJob(pb2.JobRequest(job_id=queued.job_id), metadata=auth))
        states = [m.state for m in stream]
        assert states[-1] == "done" and "running" in states, states
        assert len(states) == len(set(zip(states, [m.attempts for m in stream], strict=True)))
        watched = stream[-1]
        assert watched.mask_path and watched.error == "" and watched.error_code == ""
        assert watched.probabilities_path
        got = stub.GetJob(pb2.JobRequest(job_id=queued.job_id), metadata=auth)
        assert (got.state, got.mask_path) == ("done", watched.mask_path)
        assert got.probabilities_path == watched.probabilities_path
        # Waiting for the mask in the call itself (the seed's way): a new job, a new mask.
        waited = stub.Tumor(pb2.TumorRequest(image_path=folder), metadata=auth, timeout=300)
        assert waited.state == "done" and waited.job_id != queued.job_id

    with httpx.Client(base_url=f"http://127.0.0.1:{node.web_port}", timeout=300) as client:
        r = client.post("/inference/tumor", json={"image_path": folder},
                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert r.status_code == 200, r.text
    over_http = read_nifti(Path(r.json()["mask_path"]))
    assert np.count_nonzero(over_http.array == 2) > 0  # the phantom's tumour was found
    # The probability map beside the mask: background + 2 labels on the mask's voxels,
    # its argmax the label map wherever post-processing left the model's answer alone.
    for path in (r.json()["probabilities_path"], watched.probabilities_path):
        probabilities = np.asarray(nib.load(path).dataobj)  # x, y, z, channel
        assert probabilities.shape == (*over_http.array.shape[::-1], 3)
        argmax = np.transpose(np.argmax(probabilities, axis=3), (2, 1, 0))
        assert np.mean(argmax == over_http.array) > 0.99
    for path in (watched.mask_path, waited.mask_path):
        over_grpc = read_nifti(Path(path))
        assert over_grpc.array.shape == over_http.array.shape
        np.testing.assert_array_equal(over_grpc.array, over_http.array)
        for field in ("origin_lps", "spacing_zyx", "direction"):
            np.testing.assert_array_equal(getattr(over_grpc, field), getattr(over_http, field))
    with node.db.session() as s:
        states = s.execute(select(Job.id, Job.state).order_by(Job.id)).all()
    assert [state for _, state in states] == ["done"] * 3
    queued_records = audit_rows(node, action="path_job_queued", outcome="success")
    assert [rec.detail.get("transport") for rec in queued_records] == ["grpc", "grpc", None]


# -- access and path checks (no model runs: the worker is off) -------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("grpc")
    allowed, outside = base / "allowed", base / "outside"
    for folder in (allowed / "ct", outside / "ct"):
        folder.mkdir(parents=True)
        (folder / "1.dcm").write_bytes(b"\0" * 132 + b"DICM")
    (outside / "secret.txt").write_text("not an image")
    os.symlink(outside / "ct", allowed / "link-out")
    grpc_port = free_port()
    overrides = {
        **SHIPPED,
        "path_api": {"allowed_roots": [allowed]},
        "grpc": {"enabled": True, "port": grpc_port},
    }
    with running_node(base, **overrides) as node:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield node, allowed, outside, role_users(node), pb2_grpc.PathInferenceStub(channel)
        channel.close()


def test_no_token_is_unauthenticated_and_viewers_are_refused_as_over_http(site) -> None:
    node, allowed, _, headers, stub = site
    request = pb2.TumorRequest(image_path=str(allowed / "ct"), wait_s=0)
    for metadata in ((), (("authorization", "Bearer dn_not-a-token"),),
                     (("authorization", "Basic YWRhOnB3"),)):  # fmt: skip
        code, details = _code(stub.Tumor, request, metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, details)
        assert "bearer token is required" in details
    code, _ = _code(stub.WatchJob, pb2.JobRequest(job_id=1))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    http = TestClient(create_app(node.view()))
    for role in ("viewer", "reviewer"):
        over_http = http.post("/inference/tumor?wait_s=0", headers=headers[role],
                              json={"image_path": str(allowed / "ct")})  # fmt: skip
        assert over_http.status_code == 403
        calls = [
            (stub.Tumor, request),
            (stub.Vessel, pb2.VesselRequest(image_A_path="/a", image_P_path="/p")),
            (stub.GetJob, pb2.JobRequest(job_id=1)),
            (stub.WatchJob, pb2.JobRequest(job_id=1)),
        ]
        for call, message in calls:
            code, details = _code(call, message, metadata=_bearer(headers[role]))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, call)
            assert details == over_http.json()["detail"]  # the same words
    denied = audit_rows(node, action="request_denied", actor="viewer-user")
    assert f"gRPC /{SERVICE}/Tumor" in {rec.object_id for rec in denied}
    grpc_denial = next(rec for rec in denied if rec.object_id == f"gRPC /{SERVICE}/Tumor")
    assert grpc_denial.detail["transport"] == "grpc" and grpc_denial.source == "127.0.0.1"
    assert grpc_denial.detail["token"] == "viewer tests"
    with node.db.session() as s:
        assert s.scalar(select(func.count(Job.id))) == 0


def test_outside_the_roots_is_one_refusal_whether_or_not_the_path_exists(site) -> None:
    node, allowed, outside, headers, stub = site
    admin = _bearer(headers["admin"])
    http = TestClient(create_app(node.view()))
    probes = {
        "existing file": outside / "secret.txt",
        "existing folder": outside / "ct",
        "missing": outside / "nothing-here.nii.gz",
        "the password hashes": Path("/etc/shadow"),
        "missing under /": Path("/no/such/folder"),
        "dot-dot out of a root": allowed / ".." / "outside" / "ct",
        "link inside pointing out": allowed / "link-out",
        "a sibling named like the root": Path(str(allowed) + "-evil"),
    }
    answers = set()
    for name, path in probes.items():
        code, details = _code(stub.Tumor, pb2.TumorRequest(image_path=str(path), wait_s=0),
                              metadata=admin)  # fmt: skip
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
        over_http = http.post("/inference/tumor?wait_s=0", headers=headers["admin"],
                              json={"image_path": str(path)})  # fmt: skip
        assert over_http.status_code == 403 and over_http.json()["detail"] == details, name
        answers.add(details.replace(str(path), "<path>"))
    assert len(answers) == 1, answers  # no oracle
    assert "not under a folder the path API may read" in answers.pop()
    # A two-input pipeline: the same refusal for its second path.
    code, details = _code(stub.Vessel, pb2.VesselRequest(
        image_A_path=str(allowed / "ct"), image_P_path=str(outside / "ct"), wait_s=0),
        metadata=admin)  # fmt: skip
    assert code == grpc.StatusCode.PERMISSION_DENIED and "input P" in details
    with node.db.session() as s:
        assert s.scalar(select(func.count(Job.id))) == 0  # nothing queued
    denied = audit_rows(node, action="path_job_queued", outcome="denied", actor="admin-user")
    over_grpc = [rec for rec in denied if rec.detail.get("transport") == "grpc"]
    assert len(over_grpc) == len(probes) + 1 and len(denied) == 2 * len(probes) + 1


def test_bad_requests_inside_the_roots_and_job_states(site) -> None:
    node, allowed, _, headers, stub = site
    operator = _bearer(headers["operator"])
    invalid = {
        "does not exist": pb2.TumorRequest(image_path=str(allowed / "missing.nii.gz")),
        "absolute path": pb2.UreterRequest(image_D_path="relative/ct"),
        "image_P_path is missing": pb2.VesselRequest(image_A_path=str(allowed / "ct")),
        "image_path is missing": pb2.TotalsegRequest(),
        "wait_s must be between 0 and 3600": pb2.TumorRequest(
            image_path=str(allowed / "ct"), wait_s=-1
        ),
    }
    calls = {pb2.TumorRequest: stub.Tumor, pb2.UreterRequest: stub.Ureter,
             pb2.VesselRequest: stub.Vessel, pb2.TotalsegRequest: stub.Totalseg}  # fmt: skip
    for words, request in invalid.items():
        code, details = _code(calls[type(request)], request, metadata=operator)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (words, details)
    code, details = _code(stub.GetJob, pb2.JobRequest(job_id=987654), metadata=operator)
    assert code == grpc.StatusCode.NOT_FOUND and details == "job 987654 is not a path API job"
    code, _ = _code(stub.WatchJob, pb2.JobRequest(job_id=0), metadata=operator)
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    # Queued (no worker runs it): its state, then expired, as GetJob and the stream say.
    reply = stub.Tumor(pb2.TumorRequest(image_path=str(allowed / "ct"), wait_s=0.3),
                       metadata=operator)  # fmt: skip
    assert (reply.state, reply.mask_path) == ("queued", "")
    again = stub.Tumor(pb2.TumorRequest(image_path=str(allowed / "ct"), wait_s=0),
                       metadata=operator)  # fmt: skip
    assert again.job_id == reply.job_id  # the identical queued request is joined
    got = stub.GetJob(pb2.JobRequest(job_id=reply.job_id), metadata=operator)
    assert (got.job_id, got.state, got.mask_path) == (reply.job_id, "queued", "")
    queued = audit_rows(node, action="path_job_queued", outcome="success")
    assert queued[-1].actor == "operator-user" and queued[-1].object_id == str(reply.job_id)
    assert queued[-1].detail == {"pipeline": "tumor", "paths": {"image": str(allowed / "ct")},
                                 "token": "operator tests", "token_id": queued[-1].detail[
                                     "token_id"], "transport": "grpc"}  # fmt: skip
    assert queue.expire_queued(node.db, max_age_s=0) >= 1
    code, details = _code(stub.GetJob, pb2.JobRequest(job_id=reply.job_id), metadata=operator)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in details
    http = TestClient(create_app(node.view()))
    over_http = http.get(f"/inference/jobs/{reply.job_id}", headers=headers["operator"])
    assert over_http.status_code == 410 and over_http.json()["detail"] == details
    (last,) = stub.WatchJob(pb2.JobRequest(job_id=reply.job_id), metadata=operator)
    assert (last.state, last.error_code, last.error) == ("expired", "DEADLINE_EXCEEDED", details)


# -- the server, its settings and its generated code -----------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 with its key, and another key."""
    folder.mkdir()
    cert, key, other = folder / "node.pem", folder / "node.key", folder / "other.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", key, "-out", cert, "-subj", "/O=Test Hospital/CN=dicom-node",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    subprocess.run(["openssl", "genrsa", "-out", other, "2048"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return cert, key, other


def test_tls_with_the_nodes_certificate_a_stop_and_setup_errors(tmp_path: Path) -> None:
    cert, key, other_key = _self_signed(tmp_path / "pki")
    port = free_port()
    (tmp_path / "a").mkdir()
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.secure_channel(f"localhost:{port}", credentials)
    stub = pb2_grpc.PathInferenceStub(channel)
    with running_node(tmp_path / "a", **SHIPPED, tls={"certificate": cert, "private_key": key},
                      grpc={"enabled": True, "port": port, "tls": True}) as node:  # fmt: skip
        token = make_users(node)
        auth = (("authorization", f"Bearer {token}"),)
        code, details = _code(stub.GetJob, pb2.JobRequest(job_id=5), metadata=auth)
        assert code == grpc.StatusCode.NOT_FOUND, details  # answered over TLS
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            code, _ = _code(pb2_grpc.PathInferenceStub(plain).GetJob,
                            pb2.JobRequest(job_id=5), metadata=auth, timeout=5)  # fmt: skip
            assert code == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
        # The port is taken: another server (Node.start builds it before any loop runs)
        # refuses to start, naming the address and the keys.
        taken = load_settings(None, grpc={"enabled": True, "port": port})
        with pytest.raises(GrpcSetupError, match=f"cannot listen on 127.0.0.1:{port} "
                           r"\(grpc.host, grpc.port\): the port is in use"):  # fmt: skip
            GrpcServer(taken)
        # A job under data_dir that no worker runs, watched while the node stops.
        folder = Path(node.settings.data_dir) / "incoming"
        folder.mkdir()
        (folder / "1.dcm").write_bytes(b"\0" * 132 + b"DICM")
        job = stub.Tumor(pb2.TumorRequest(image_path=str(folder), wait_s=0), metadata=auth)
        stream = stub.WatchJob(pb2.JobRequest(job_id=job.job_id), metadata=auth, timeout=30)
        assert next(stream).state == "queued"
    with pytest.raises(grpc.RpcError) as ended:  # the node stopped: UNAVAILABLE, not a hang
        next(stream)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == (
        f"the node is stopping; watch job {job.job_id} again after its restart"
    )
    channel.close()
    with pytest.raises(ConfigError, match="grpc.tls serves the node's certificate: set "
                       "tls.certificate and tls.private_key"):  # fmt: skip
        load_settings(None, grpc={"enabled": True, "tls": True})
    wrong_key = {"certificate": cert, "private_key": other_key}
    grpc_tls = {"enabled": True, "tls": True, "port": free_port()}
    mismatched = load_settings(None, tls=wrong_key, grpc=grpc_tls)
    with pytest.raises(GrpcSetupError, match="grpc.tls: cannot use certificate .* the "
                       "private key does not belong to the certificate"):  # fmt: skip
        GrpcServer(mismatched)


def _descriptor(generated: Path) -> descriptor_pb2.FileDescriptorProto:
    """The file descriptor a generated ``*_pb2.py`` registers (its serialized bytes)."""
    text = generated.read_text()
    literal = text.split("AddSerializedFile(", 1)[1].split(")\n", 1)[0]
    return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(literal))


def test_generated_code_matches_the_proto_and_every_problem_has_a_status(tmp_path) -> None:
    from grpc_tools import protoc

    relative = PROTO.relative_to(REPO_ROOT)
    args = ["protoc", f"-I{REPO_ROOT}", f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(relative)]  # fmt: skip
    assert protoc.main(args) == 0
    fresh, committed = tmp_path / relative.parent, PROTO.parent
    # Descriptors, not text: the text varies with the grpcio-tools version, the messages
    # and methods it describes must not.
    assert _descriptor(fresh / "path_inference_pb2.py") == _descriptor(
        committed / "path_inference_pb2.py"
    ), "path_inference_pb2*.py are out of date: regenerate them (see path_inference.proto)"
    methods = [m.name for m in pb2.DESCRIPTOR.services_by_name["PathInference"].methods]
    assert methods == ["Totalseg", "Vessel", "Ureter", "Tumor", "GetJob", "WatchJob"]
    for stub in (fresh, committed):
        text = (stub / "path_inference_pb2_grpc.py").read_text()
        assert all(f"'/{SERVICE}/{m}'" in text for m in methods), stub
    # Both transports map every problem, and the web route needs the shared role.
    assert set(GRPC_CODE) == set(Problem) == set(HTTP_STATUS)
    assert require_operator.role == path_requests.ROLE  # type: ignore[attr-defined]
    assert peer_address("ipv6:[::1]:50122") == "::1"
    assert peer_address("ipv4:10.0.0.7:50122") == "10.0.0.7"
