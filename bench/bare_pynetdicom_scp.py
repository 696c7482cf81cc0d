"""A bare pynetdicom storage SCP: the floor of what a pynetdicom-based receiver costs.

Each C-STORE's ``encoded_dataset()`` is written to a temporary file, fsynced, renamed into
place and the folder fsynced (the node's durability), nothing else: no header parsing,
no database. pynetdicom's own server and threads, as shipped (1 ms polling loops).

    python bench/bare_pynetdicom_scp.py PORT OUT_DIR [AE_TITLE]
"""

from __future__ import annotations

import os
import sys
import uuid

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def main() -> None:
    port, out = int(sys.argv[1]), sys.argv[2]
    aet = sys.argv[3] if len(sys.argv) > 3 else "BARE"
    os.makedirs(out, exist_ok=True)

    def store(event: evt.Event) -> int:
        data = event.encoded_dataset()
        final = os.path.join(out, f"{uuid.uuid4().hex}.dcm")
        tmp = final + ".part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        folder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        return 0x0000

    ae = AE(aet)
    ae.maximum_pdu_size = 1048576  # as the node's default max_pdu_size
    ae.maximum_associations = 64
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, SYNTAXES)
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, store)])


if __name__ == "__main__":
    main()
