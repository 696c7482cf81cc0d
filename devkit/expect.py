"""What the node should produce for given input files: expected result UIDs.

Tests and the demo compute the UIDs a result must carry from the files they sent, the
same way the node derives them from the exact input (``inference.results``), and then
wait for that object in the PACS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.results import input_identity, pipeline_version, result_uids
from inference.volume import load_series
from kernel.vocabulary import ResultType


def expected_result_uids(
    node: Any,
    pipeline: str,
    inputs: Mapping[str, Sequence[str | Path]],
    result_type: ResultType | str = ResultType.BINARY,
) -> tuple[str, str, int]:
    """(SeriesInstanceUID, SOPInstanceUID, SeriesNumber) of ``pipeline``'s result on
    ``inputs`` (input role -> the files of the series sent for it) on a running node."""
    spec = node.rules.get().pipelines[pipeline]
    models = [node.registry.get(m) for m in spec.models]
    version = pipeline_version({m.id: m.version for m in models})
    volumes = {role: load_series(files) for role, files in inputs.items()}
    reference = volumes[models[0].channels[0]]
    return result_uids(
        reference.series_uid, pipeline, version, result_type, input_identity(volumes)
    )
