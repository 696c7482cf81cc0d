"""``dicom-node retrieve``: ask a configured source for a study from the command line.

The command writes a retrieve request into the node's database (audited as
``cli:<OS user>``) and, unless ``--no-wait``, follows it until the running node's
retrieval loop has received the study or failed, printing the progress. The node itself
retrieves (its listener is where a C-MOVE stores), so ``dicom-node serve`` must be
running with the same settings. Exit status: 0 received, 1 failed (the reason on
standard error) or still not done after ``--wait-s``, 2 a bad request (unknown source or
pipeline, a query that names no study).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from dicom_node import audit, retrieve
from dicom_node.retrieve import RetrieveError
from dicom_node.rules import load_rules
from kernel.settings import load_settings
from kernel.vocabulary import RetrieveState

# How long a request may wait untaken before the command says the node may not run.
UNTAKEN_WARNING_S = 15.0


def add_parser(sub: Any, node_db: Callable[[argparse.Namespace], Any]) -> None:
    """Add ``retrieve`` to the command line; ``node_db(args)`` opens the node's database
    (and refuses when the command does not say which node is meant)."""
    p = sub.add_parser(
        "retrieve",
        help="ask a source for a study; the running node retrieves it and runs pipelines",
    )
    p.add_argument("--source", required=True, help="a source of the settings (sources)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--accession", help="AccessionNumber of the study")
    which.add_argument("--study-uid", help="StudyInstanceUID of the study")
    which.add_argument("--patient-id", help="PatientID (with --date-from / --date-to)")
    p.add_argument("--date-from", help="study date from (YYYYMMDD or YYYY-MM-DD)")
    p.add_argument("--date-to", help="study date to, inclusive")
    p.add_argument(
        "--pipeline",
        action="append",
        dest="pipelines",
        metavar="NAME",
        help="run this pipeline (repeat for several); none: the routing rules choose",
    )
    p.add_argument("--no-wait", action="store_true", help="only make the request")
    p.add_argument(
        "--wait-s", type=float, default=3600.0, help="follow it at most this long (3600)"
    )
    p.set_defaults(func=lambda args: run(args, node_db))


def run(args: argparse.Namespace, node_db: Callable[[argparse.Namespace], Any]) -> int:
    settings = load_settings(args.config)
    try:
        settings.source(args.source)
        query = retrieve.parse_query(
            args.study_uid, args.accession, args.patient_id, args.date_from, args.date_to
        )
        catalog = load_rules(settings.rules_file).pipelines if args.pipelines else {}
        pipelines = retrieve.check_pipelines(args.pipelines, catalog)
    except (KeyError, RetrieveError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        print(f"dicom-node: {message}", file=sys.stderr)
        return 2
    db = node_db(args)
    actor = audit.cli_actor()
    request_id = retrieve.create(db, args.source, query, pipelines, actor.name)
    audit.record(
        db,
        audit.Action.RETRIEVE_REQUESTED,
        actor,
        object_type="retrieve",
        object_id=request_id,
        study_uid=query.study_uid,
        patient_id=query.patient_id,
        detail={"source": args.source, "query": query.describe(), "pipelines": pipelines},
    )
    wanted = ", ".join(pipelines) if pipelines else "the rules' choice"
    print(f"retrieve #{request_id}: {query.describe(True)} from {args.source}; pipelines: {wanted}")
    if args.no_wait:
        return 0
    return follow(db, request_id, args.wait_s)


def follow(db: Any, request_id: int, wait_s: float) -> int:
    """Print the request's progress until it ends; 0 received, 1 failed or not done."""
    started = time.monotonic()
    shown = None
    warned = False
    while True:
        with db.session() as s:
            row = retrieve.as_dict(retrieve.get(s, request_id))
        expected = row["instances_expected"]
        failed = row["instances_failed"]
        line = (
            f"{row['state']}: {row['instances_received']} / "
            f"{expected if expected is not None else '?'} instances"
            + (f", {failed} failed" if failed else "")
        )
        if line != shown:
            print(line, flush=True)
            shown = line
        if row["state"] == RetrieveState.RECEIVED:
            print(f"study {row['study_uid']} received; routing takes it from here")
            return 0
        if row["state"] == RetrieveState.FAILED:
            print(f"dicom-node: retrieve #{request_id} failed: {row['reason']}", file=sys.stderr)
            return 1
        waited = time.monotonic() - started
        if row["state"] == RetrieveState.REQUESTED and waited > UNTAKEN_WARNING_S and not warned:
            warned = True
            print(
                "the node has not taken the request yet: is `dicom-node serve` running with "
                "these settings (and this source)?",
                file=sys.stderr,
            )
        if waited > wait_s:
            print(
                f"dicom-node: retrieve #{request_id} still {row['state']} after {wait_s:g} s; "
                f"follow it on the Retrieve page or at /api/retrievals/{request_id}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
