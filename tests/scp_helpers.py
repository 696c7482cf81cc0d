"""Sending hand-made (broken) datasets over a real association."""

from __future__ import annotations

import time
from io import BytesIO
from typing import cast

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE


def associate(
    port: int, calling_ae: str = "TEST_SCU", called_ae: str = "DICOM_NODE"
) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=called_ae)


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset as it travels in a P-DATA (no preamble or file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False  # explicit VR little endian
    write_dataset(buf, ds)
    return buf.getvalue()


def send_raw(assoc: Association, sop_uid: str, payload: bytes, msg_id: int = 1) -> int | None:
    """C-STORE ``payload`` as-is (possibly corrupt); returns the response status."""
    context = assoc._get_valid_context(CTImageStorage, ExplicitVRLittleEndian, "scu")
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_uid
    req.DataSet = BytesIO(payload)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    assoc.dimse.send_msg(req, cast(int, context.context_id))
    _, rsp = assoc.dimse.get_msg(block=True)
    assoc._reactor_checkpoint.set()
    return None if rsp is None else int(rsp.Status)
