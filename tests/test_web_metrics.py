"""/metrics moves when a study flows through the node."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import storescu, wait_until
from tests.dicom_factory import ct_series
from tests.web_helpers import client_for, failed_job, modelless_settings


def _samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_counters_move_when_a_study_flows_through(tmp_path, start_node):
    node = start_node(**modelless_settings(tmp_path))
    client = client_for(node)
    before = _samples(client)
    assert before[("dicom_node_instances_received_total", ())] == 0
    assert before[("dicom_node_queue_depth", ())] == 0

    files = ct_series(tmp_path / "in", n=3, description="LOCALIZER")
    assert storescu(files, node.settings.port).returncode == 0
    wait_until(
        lambda: _samples(client)[("dicom_node_instances_received_total", ())] == 3, 20, "3 counted"
    )
    after = _samples(client)
    assert after[("dicom_node_associations_total", ())] >= 1
    assert sum(v for (name, _), v in after.items() if name == "dicom_node_series") == 1

    failed_job(node)
    after = _samples(client)
    assert after[("dicom_node_jobs", (("state", "failed"),))] == 1
    assert after[("dicom_node_job_duration_seconds_count", ())] == 0
    assert ("dicom_node_sends_total", (("outcome", "sent"),)) in after
