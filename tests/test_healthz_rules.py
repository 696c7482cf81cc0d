"""/healthz when the rules file on disk was edited and rejected: the node keeps routing
by the previous rules (hot reload), and says so, until the file is fixed."""

from __future__ import annotations

import os
import time

from tests.web_helpers import RULES, client_for, modelless_settings


def _touch_later(path, step_ns: int) -> None:
    os.utime(path, ns=(time.time_ns(), time.time_ns() + step_ns))


def test_a_rejected_rules_edit_degrades_the_node_until_the_file_is_fixed(tmp_path, start_node):
    settings = modelless_settings(tmp_path)
    node = start_node(web={"enabled": False}, **settings)
    client = client_for(node)
    rules = settings["rules_file"]

    body = client.get("/healthz").json()
    assert (body["status"], body["rules"]) == ("ok", "ok"), body

    rules.write_text("rules:\n  - name: broken\n    pipelines: [no_such_pipeline]\n")
    _touch_later(rules, 1_000_000)
    answer = client.get("/healthz")
    body = answer.json()
    assert answer.status_code == 200 and body["ready"] is True  # it still receives
    assert (body["status"], body["rules"]) == ("degraded", "rejected"), body
    reason = next(r for r in body["reasons"] if r.startswith("rules file"))
    assert str(rules) in reason and "previous rules stay in force" in reason
    assert "no_such_pipeline" in reason
    assert "dicom_node_degraded 1.0" in client.get("/metrics").text

    rules.write_text(RULES)
    _touch_later(rules, 2_000_000)
    body = client.get("/healthz").json()
    assert (body["status"], body["rules"]) == ("ok", "ok"), body
    assert not any(r.startswith("rules file") for r in body["reasons"])
