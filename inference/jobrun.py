"""One pipeline run on one job: load the inputs once, run the models, write the SEG.

Runs inside the worker child process (``inference.child``). The Result and outbox rows
are written in the same transaction that marks the job done, and only while this attempt
still owns the job: a job is recorded, and its SEG queued for sending, exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, Job, Result, Series, utcnow
from db.session import Database
from inference import path_api, queue
from inference.engine import Engine, PipelineResult
from inference.phase_evidence import PHASE_EVIDENCE_JOB, EvidenceError, measure
from inference.results import (
    RESULT_SOP_CLASS_UIDS,
    SEG_SOP_CLASS_UID,
    Algorithm,
    input_identity,
    result_uids,
    series_description,
)
from inference.seg_writer import write_seg
from inference.volume import Volume
from kernel import outbox
from kernel.catalog import PipelineSpec
from kernel.events import add_event
from kernel.settings import Destination
from kernel.vocabulary import EventKind, EventLevel, OutboxKind, ResultType


def series_files(session: Session, series_uid: str) -> list[str]:
    """Paths of the instances of a received series, in no particular order."""
    rows = session.scalars(
        select(Instance.path).join(Series).where(Series.series_uid == series_uid)
    )
    return list(rows)


@dataclass
class WrittenSeg:
    path: Path
    sop_uid: str
    series_uid: str
    source_series_uid: str
    label_count: int
    result_type: ResultType = ResultType.BINARY
    sop_class_uid: str = SEG_SOP_CLASS_UID
    destinations: tuple[str, ...] = ()
    empty: bool = False
    transcoded: str | None = None  # why its text was written as ISO_IR 192 (charsets)


class JobRunner:
    """Runs claimed jobs with a warm Engine; one per worker child.

    ``pipelines`` looks a job's pipeline up in the pipeline catalog (name -> spec, None
    when unknown); ``destinations`` gives the destinations every result goes to.
    """

    def __init__(
        self,
        db: Database,
        engine: Engine,
        pipelines: Callable[[str], PipelineSpec | None],
        results_dir: Path,
        destinations: Callable[[], list[Destination]],
    ) -> None:
        self.db = db
        self.engine = engine
        self.pipelines = pipelines
        self.results_dir = Path(results_dir)
        self.destinations = destinations

    def run(self, job_id: int, owner: queue.Owner) -> str:
        """Run the job and record it as done; returns the job's state afterwards.

        Exceptions propagate: the caller counts the failed attempt.
        """
        with self.db.session() as s:
            job = s.get_one(Job, job_id)
            s.expunge(job)
        summary, segs = self.process(job)
        if not segs:
            return queue.finish(self.db, job.id, summary, owner=owner)

        def record(s: Session, row: Job) -> None:
            for seg in segs:
                self._record_result(s, row, seg)

        return queue.finish(self.db, job.id, summary, owner=owner, record=record)

    def _load_inputs(self, job: Job) -> dict[str, Volume]:
        """Each input series read once per worker: the engine's volume cache is shared by
        every job and pipeline of the study."""
        with self.db.session() as s:
            files = {role: series_files(s, uid) for role, uid in job.inputs.items()}
        return {
            role: path_api.load_input(
                job.inputs[role], engine=self.engine, series_files=lambda _uid, f=paths: f
            )
            for role, paths in files.items()
        }

    def process(self, job: Job) -> tuple[dict[str, Any], list[WrittenSeg]]:
        started = time.perf_counter()
        if job.pipeline == PHASE_EVIDENCE_JOB:
            return self._phase_evidence(job), []
        spec = self.pipelines(job.pipeline)
        if spec is None:
            raise KeyError(f"pipeline {job.pipeline!r} is not defined in the pipeline catalog")
        if path_api.is_path_job(job.inputs):  # HTTP path API: a NIfTI mask, no SEG
            mask_dir = self.results_dir / "masks" / f"job-{job.id}"
            return path_api.run_path_job(self.engine, job.pipeline, spec, job.inputs, mask_dir), []
        inputs = self._load_inputs(job)
        loaded = time.perf_counter()
        study_uid = str(next(iter(inputs.values())).headers[0].StudyInstanceUID)
        result = self.engine.run(
            job.pipeline, spec, inputs, mask_dir=self.results_dir / study_uid / "masks"
        )
        inferred = time.perf_counter()
        identity = input_identity(inputs)
        summary: dict[str, Any] = {
            "labels": _label_volumes_ml(result),
            "model_versions": result.model_versions,
            "input_identity": identity,
            "instances": {role: len(volume.files) for role, volume in inputs.items()},
            "seconds": {
                "load": round(loaded - started, 3),
                "inference": round(inferred - loaded, 3),
            },
        }
        left_out = {role: v.left_out for role, v in inputs.items() if v.left_out}
        if left_out:
            summary["left_out"] = left_out
        empty = not bool(result.label_map.any())
        outputs = self._outputs(empty)
        if "fractional_seg" in spec.probabilities and not empty:
            takes_seg = [
                name
                for kind in (ResultType.BINARY, ResultType.LABELMAP)
                for name in outputs.get(kind, [])
            ]
            if takes_seg or not self.destinations():
                outputs[ResultType.FRACTIONAL] = takes_seg
        segs = [
            self._write_seg(job, result, result_type, tuple(names), empty, identity)
            for result_type, names in outputs.items()
        ]
        if result.probabilities_path is not None:
            summary["probabilities_path"] = str(result.probabilities_path)
        if empty:
            summary["empty"] = True
            sent_to = sorted(n for seg in segs for n in seg.destinations)
            with self.db.session() as s:
                add_event(
                    s,
                    EventKind.RESULT_EMPTY,
                    f"pipeline {job.pipeline} found no label in series "
                    f"{result.reference.series_uid}: "
                    + (
                        f"'no finding' SEG queued for {', '.join(sent_to)}"
                        if sent_to
                        else "nothing sent (empty_result: skip)"
                    ),
                    level=EventLevel.WARNING,
                    study_uid=_study_uid(s, job),
                    job_id=job.id,
                )
        if segs:
            summary["seconds"]["write"] = round(time.perf_counter() - inferred, 3)
            summary["seg_sop_uid"] = segs[0].sop_uid
            summary["segs"] = [
                {
                    "sop_uid": g.sop_uid,
                    "result_type": g.result_type,
                    "destinations": list(g.destinations),
                    **({"transcoded": g.transcoded} if g.transcoded else {}),
                }
                for g in segs
            ]
        return summary, segs

    def _phase_evidence(self, job: Job) -> dict[str, Any]:
        """Measure the image evidence of the job's series (``inference.phase_evidence``).

        A series the model finds no aorta in is a finished job with the reason (the router
        records "no image evidence (why)"); an unreadable series fails the job.
        """
        config = job.inputs.get("evidence") or {}
        series_uid = job.inputs["image"]
        with self.db.session() as s:
            files = series_files(s, series_uid)
        volume = path_api.load_input(
            series_uid, engine=self.engine, series_files=lambda _uid: files
        )
        try:
            measured = measure(self.engine, config["model"], volume, config["structures"])
        except EvidenceError as exc:
            return {"no_image_evidence": str(exc)}
        return {"image_evidence": measured}

    def _outputs(self, empty: bool) -> dict[ResultType, list[str]]:
        """SEG flavour -> the destinations that get it. A result is written once per
        flavour; an empty one only for destinations that asked to be told (``send``).
        With no destination at all a BINARY SEG is still written and recorded."""
        destinations = self.destinations()
        outputs: dict[ResultType, list[str]] = {}
        for dest in destinations:
            if empty and dest.empty_result != "send":
                continue
            outputs.setdefault(dest.result_type, []).append(dest.name)
        if not destinations and not empty:
            outputs[ResultType.BINARY] = []
        return outputs

    def _write_seg(
        self,
        job: Job,
        result: PipelineResult,
        result_type: ResultType,
        destinations: tuple[str, ...],
        empty: bool,
        identity: str,
    ) -> WrittenSeg:
        ref = result.reference
        series_uid, sop_uid, series_number = result_uids(
            ref.series_uid, job.pipeline, result.version, result_type, identity
        )
        folder = self.results_dir / str(ref.headers[0].StudyInstanceUID) / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        transcoded: list[Any] = []  # the writer's OutputCharacterSet, when it transcoded
        common: dict[str, Any] = dict(
            path=folder / f"{sop_uid}.dcm",
            algorithm=Algorithm(name=job.pipeline, version=result.version),
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=series_number,
            series_description=series_description(job.pipeline, result.version),
            allow_empty=empty,
            on_transcode=transcoded.append,
        )
        if result_type == ResultType.RTSTRUCT:
            from inference.rtstruct_writer import write_rtstruct

            path = write_rtstruct(ref.headers, result.label_map, result.labels, **common)
        elif result_type == ResultType.FRACTIONAL:
            from inference.fractional_seg import write_fractional_seg

            del common["allow_empty"]
            path = write_fractional_seg(ref.headers, result.probabilities, result.labels, **common)
        else:
            path = write_seg(
                ref.headers, result.label_map, result.labels, seg_type=result_type, **common
            )
        return WrittenSeg(
            path,
            sop_uid,
            series_uid,
            ref.series_uid,
            len(result.labels),
            result_type=result_type,
            sop_class_uid=RESULT_SOP_CLASS_UIDS[result_type],
            destinations=destinations,
            empty=empty,
            transcoded=transcoded[0].describe() if transcoded else None,
        )

    def _record_result(self, s: Session, job: Job, seg: WrittenSeg) -> None:
        row = s.scalars(select(Result).where(Result.sop_uid == seg.sop_uid)).one_or_none()
        if row is None:
            s.add(
                Result(
                    job_id=job.id,
                    study_id=job.study_id,
                    kind="RTSTRUCT" if seg.result_type == ResultType.RTSTRUCT else "SEG",
                    sop_uid=seg.sop_uid,
                    series_uid=seg.series_uid,
                    sop_class_uid=seg.sop_class_uid,
                    source_series_uid=seg.source_series_uid,
                    path=str(seg.path),
                    pipeline=job.pipeline,
                    result_type=seg.result_type,
                )
            )
        else:  # the same input again: the same object, written again in place
            row.job_id, row.created_at = job.id, utcnow()
            row.superseded_at = row.superseded_by = None
        self._supersede_earlier(s, job, seg)
        held = self._held_for_review(job, seg)
        # A re-run's result replaces the earlier one at each destination too.
        outbox.queue(
            s,
            study_id=job.study_id,
            kind=OutboxKind.RESULT,
            sop_uid=seg.sop_uid,
            sop_class_uid=seg.sop_class_uid,
            path=str(seg.path),
            destinations=seg.destinations,
            held=held,
        )
        content = "no finding" if seg.empty else f"{seg.label_count} labels"
        sent_now = [d for d in seg.destinations if d not in held]
        add_event(
            s,
            EventKind.RESULT_WRITTEN,
            f"{job.pipeline} {seg.result_type} {seg.sop_uid} ({content}) "
            + (
                f"queued for {', '.join(sent_now)}"
                if sent_now
                else ("held for review" if held else "queued for no destination")
            ),
            study_uid=_study_uid(s, job),
            series_uid=seg.source_series_uid,
            job_id=job.id,
        )
        if held:
            add_event(
                s,
                EventKind.RESULT_HELD,
                f"{job.pipeline} {seg.result_type} {seg.sop_uid} ({content}) held for review "
                f"before it is sent to {', '.join(held)}",
                study_uid=_study_uid(s, job),
                series_uid=seg.source_series_uid,
                job_id=job.id,
                data={"destinations": held},
            )
        if seg.transcoded:
            add_event(
                s,
                EventKind.RESULT_TRANSCODED,
                f"{seg.result_type} {seg.sop_uid}: {seg.transcoded}",
                level=EventLevel.WARNING,
                study_uid=_study_uid(s, job),
                series_uid=seg.source_series_uid,
                job_id=job.id,
            )

    def _held_for_review(self, job: Job, seg: WrittenSeg) -> list[str]:
        """The destinations of ``seg`` that must wait for a reviewer: all of them when
        the pipeline says ``review: required``, else those whose destination says so."""
        spec = self.pipelines(job.pipeline)
        if spec is not None and spec.review == "required":
            return list(seg.destinations)
        required = {d.name for d in self.destinations() if d.review == "required"}
        return [name for name in seg.destinations if name in required]

    def _supersede_earlier(self, s: Session, job: Job, seg: WrittenSeg) -> None:
        """Earlier results of this pipeline on this series, computed on other input, are
        superseded: marked so, and their deliveries still waiting are not sent."""
        earlier = s.scalars(
            select(Result).where(
                Result.study_id == job.study_id,
                Result.pipeline == job.pipeline,
                Result.result_type == seg.result_type,
                Result.source_series_uid == seg.source_series_uid,
                Result.sop_uid != seg.sop_uid,
                Result.superseded_at.is_(None),
            )
        ).all()
        now = utcnow()
        for old in earlier:
            old.superseded_at, old.superseded_by = now, seg.sop_uid
            withheld = outbox.supersede(s, old.sop_uid, seg.sop_uid)
            add_event(
                s,
                EventKind.RESULT_SUPERSEDED,
                f"{seg.result_type} {old.sop_uid} of pipeline {job.pipeline} is superseded by "
                f"{seg.sop_uid}, computed on other input of series {seg.source_series_uid}"
                + (f"; {withheld} waiting send(s) of it withheld" if withheld else "")
                + " (a PACS that already has it keeps it: the newer result is a new object)",
                level=EventLevel.WARNING,
                study_uid=_study_uid(s, job),
                series_uid=seg.source_series_uid,
                job_id=job.id,
            )


def _study_uid(session: Any, job: Job) -> str | None:
    uid = next(iter(job.inputs.values()), None)
    series = session.scalars(select(Series).where(Series.series_uid == uid)).one_or_none()
    return series.study.study_uid if series else None


def _label_volumes_ml(result: PipelineResult) -> dict[str, float]:
    voxel_ml = float(np.prod(result.reference.spacing_zyx)) / 1000.0
    counts = np.bincount(result.label_map.ravel(), minlength=len(result.labels) + 1)
    return {label.name: round(float(counts[label.value]) * voxel_ml, 2) for label in result.labels}
