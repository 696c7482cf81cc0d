"""``dicom-node demo``: the whole chain on real components, on this machine.

Starts a real Orthanc as the PACS (a pynetdicom storage SCP only when Orthanc is not
installed), starts the node on the embedded default (SQLite, local CPU/GPU worker),
sends a synthetic N/A/P/D study with DCMTK ``storescu``, waits for the kidney-tumour SEG
(and the vessel and ureter SEGs the shipped rules also make) to arrive in the PACS, checks
the tumour SEG against the phantom's truth and prints one line.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from devkit.dcmtk import dcmtk_tool
from devkit.net import free_port
from devkit.orthanc import OrthancServer, orthanc_available
from kernel.settings import NodeSettings, load_settings

DEMO_PIPELINE = "tumor"
DEMO_PHASE = "P"
NODE_AET = "DICOM_NODE"
MODALITY_AET = "DEMO_CT"
PACS_AET = "ORTHANC"


class DemoError(RuntimeError):
    pass


def send_with_storescu(files: list[Path], port: int, called_ae: str, calling_ae: str) -> None:
    """Send files over one association with DCMTK storescu (pynetdicom if absent)."""
    storescu = dcmtk_tool("storescu")
    if storescu:
        cmd = [storescu, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        proc = subprocess.run(
            [*cmd, *map(str, files)], env=env, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise DemoError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return
    print("storescu (DCMTK) not installed: sending with pynetdicom instead", file=sys.stderr)
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise DemoError("the node refused the association")
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            if status is None or int(status.Status) != 0:
                raise DemoError(f"C-STORE of {f} failed: {status}")
    finally:
        assoc.release()


@contextmanager
def pacs(workdir: Path) -> Iterator[tuple[str, int, object]]:
    """(AE title, port, handle with .wait_for_instance/.instance_file) of a PACS."""
    if orthanc_available():
        with OrthancServer(workdir / "orthanc", aet=PACS_AET) as orthanc:
            yield PACS_AET, orthanc.dicom_port, orthanc
        return
    print("Orthanc is not installed: using a pynetdicom storage SCP as the PACS", file=sys.stderr)
    from devkit.fallback_pacs import FallbackPACS

    with FallbackPACS(workdir / "pacs", aet=PACS_AET) as fallback:
        yield PACS_AET, fallback.port, fallback


def demo_settings(workdir: Path, pacs_aet: str, pacs_port: int) -> NodeSettings:
    return load_settings(
        None,
        ae_title=NODE_AET,
        bind_address="127.0.0.1",
        port=free_port(),
        data_dir=workdir / "node",
        peers=[{"ae_title": "*", "host": "127.0.0.1"}],
        destinations=[
            {"name": "pacs", "ae_title": pacs_aet, "host": "127.0.0.1", "port": pacs_port}
        ],
        min_free_bytes=200_000_000,
        quiet_period_s=1.0,
        web={"host": "127.0.0.1", "port": 0},
        worker={"poll_interval_s": 0.2},
        dispatch={"retry_initial_s": 1.0},
        log_level=os.environ.get("DICOM_NODE_LOG_LEVEL", "WARNING"),  # the worker child's
    )


def _other_segs_in_pacs(
    node: Any, study: Any, pacs_handle: Any, started: float, timeout_s: float
) -> str:
    """Wait for the SEGs of the study's other jobs (vessel and ureter with the shipped
    rules) and name them; a missing one raises TimeoutError like the tumour SEG."""
    from sqlalchemy import select

    from db.models import Job
    from devkit.expect import expected_result_uids

    files = {series.series_uid: series.files for series in study.series}
    with node.db.session() as s:
        jobs = [(j.pipeline, j.inputs) for j in s.scalars(select(Job))]
    names = []
    for name, inputs in sorted(jobs):
        if name == DEMO_PIPELINE:
            continue
        sent = {role: files[series_uid] for role, series_uid in inputs.items()}
        _, sop_uid, _ = expected_result_uids(node, name, sent)
        pacs_handle.wait_for_instance(sop_uid, timeout_s=timeout_s - (time.monotonic() - started))
        names.append(name)
    return ",".join(names) or "none"


def _print_node_errors(node: object) -> None:
    """What went wrong inside the node, from its own record of events."""
    if node is None or not hasattr(node, "db"):
        return
    from sqlalchemy import select

    from db.models import Event

    with node.db.session() as s:
        events = s.scalars(
            select(Event).where(Event.level != "info").order_by(Event.id.desc()).limit(5)
        ).all()
    for event in reversed(events):
        print(f"  node {event.level}: {event.kind}: {event.message}", file=sys.stderr)


def run_demo(keep: bool = False, rows: int = 512, timeout_s: float = 600) -> int:
    from devkit.expect import expected_result_uids
    from devkit.synth import generate_study
    from dicom_node.service import Node
    from inference.seg_reader import dice, seg_label_map

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    node = None
    try:
        with pacs(workdir) as (pacs_aet, pacs_port, pacs_handle):
            settings = demo_settings(workdir, pacs_aet, pacs_port)
            node = Node(settings, stop_grace_s=10).start()
            study = generate_study(
                workdir / "study",
                seed=7,
                rows=rows,
                columns=rows,
                pixel_spacing_mm=round(0.78 * 512 / rows, 4),  # the same field of view
            )
            files = [f for series in study.series for f in series.files]
            send_with_storescu(files, settings.port, NODE_AET, MODALITY_AET)

            source = study.by_phase(DEMO_PHASE)
            _, seg_sop_uid, _ = expected_result_uids(
                node, DEMO_PIPELINE, {"image": source.files}
            )
            remaining = timeout_s - (time.monotonic() - started)
            instance_id = pacs_handle.wait_for_instance(seg_sop_uid, timeout_s=remaining)
            seg = pydicom.dcmread(io.BytesIO(pacs_handle.instance_file(instance_id)))

            sop_uids = [
                pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source.files
            ]
            others = _other_segs_in_pacs(node, study, pacs_handle, started, timeout_s)
            label_map, names = seg_label_map(seg, sop_uids)
            by_name = {name: number for number, name in names.items()}
            from devkit.phantom import STRUCTURES

            truth = source.truth
            kidney_truth = np.isin(truth, [STRUCTURES["kidney_left"], STRUCTURES["kidney_right"]])
            tumor_truth = truth == STRUCTURES["kidney_tumor"]
            dice_kidney = dice(label_map == by_name.get("kidney", -1), kidney_truth)
            dice_tumor = dice(label_map == by_name.get("kidney tumor", -1), tumor_truth)
            seconds = time.monotonic() - started
            outcome = (
                f"seg_sop={seg_sop_uid} received_in_pacs=yes also_in_pacs={others} "
                f"dice_kidney={dice_kidney:.3f} dice_tumor={dice_tumor:.3f} seconds={seconds:.1f}"
            )
            if min(dice_kidney, dice_tumor) < 0.9:
                print(f"DEMO FAILED: Dice below 0.9: {outcome}")
                return 1
            print(f"DEMO OK {outcome}")
            return 0
    except TimeoutError as exc:
        print(f"DEMO FAILED: the SEG did not arrive in the PACS: {exc}", file=sys.stderr)
        _print_node_errors(node)
        return 1
    except Exception as exc:
        print(f"DEMO FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.stop()
        if keep:
            print(f"demo files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
