"""A minimal pynetdicom storage SCP standing in for a PACS when Orthanc is missing.

Only the demo uses it, and only when the ``orthanc`` package is not installed; it
offers the two calls the demo needs from Orthanc (wait for an instance, fetch its file).
"""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from devkit.net import free_port
from kernel.uids import require_uid


class FallbackPACS:
    def __init__(self, folder: Path, aet: str = "PACS") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        self._server = None

    def __enter__(self) -> FallbackPACS:
        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
            )
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()

    def _store(self, event: evt.Event) -> int:
        sop_uid = require_uid(str(event.request.AffectedSOPInstanceUID), "SOPInstanceUID")
        (self.folder / f"{sop_uid}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    def wait_for_instance(self, sop_uid: str, timeout_s: float = 30) -> str:
        path = self.folder / f"{require_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sop_uid} did not arrive within {timeout_s:g} s")
            time.sleep(0.2)
        return sop_uid

    def instance_file(self, instance_id: str) -> bytes:
        return (self.folder / f"{require_uid(instance_id, 'SOPInstanceUID')}.dcm").read_bytes()
