"""The development kit: tools that make and check the node's work, never part of it.

The synthetic phantom and CT studies (``phantom``, ``synth``, ``synth_dicom``), the
end-to-end demo (``demo``), a real Orthanc started on free loopback ports (``orthanc``)
and a stand-in PACS when Orthanc is missing (``fallback_pacs``), DCMTK lookup (``dcmtk``),
free ports (``net``), the stand-in model training (``standins``, ``standin_data``), the
dciodvfy wrapper (``dciodvfy``) and a memory watcher (``memwatch``).

Production modules (``dicom_node``, ``inference``, ``kernel``, ``db``) never import this
package (checked by import-linter); ``dicom-node demo`` and ``dicom-node synth`` load it
lazily, so a deployment may leave it out.
"""
