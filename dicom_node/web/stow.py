"""STOW-RS receive: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study_uid}``
(PS3.18 10.5, Store Instances).

The body is ``multipart/related; type="application/dicom"``, one DICOM file per part. It
is read from the ASGI stream part by part (``dicom_node.stow_parts``: never the whole
body in memory) and each complete part goes through the listener's receive path
(``dicom_node.ingest``): header check, the spool's fsync and rename, the instance row,
the completeness tracker, then routing like any pushed series. The request holds the
series it stored open until it ends (no series completes, no pipeline starts, on half a
study); they complete ``quiet_period_s`` later. Everything a response names as stored is
durable and recorded before the response is sent.

With ``{study_uid}`` in the URL, an instance of another study fails (0xC409) and the
others are stored. The answer is the Store Instances Response (``dicom_node.stow_response``)
as ``application/dicom+json`` (default) or ``application/dicom+xml`` (``Accept``), with
200 / 202 / 409 / 503 / 400 as PS3.18 Table 10.5.3-1 says, and one ``Warning`` header per
failed part naming it and why. Before any part is read: 401 / 403 (auth), 406 (Accept),
415 (not multipart/related of application/dicom), 400 (no boundary, bad study UID).

Operators (and admins) may store: storing starts pipelines and sends results, the same
duty as retrieving a study. An API token is the normal client; a browser session needs
its CSRF token in ``X-CSRF-Token`` like any POST. A client that disconnects keeps what was
stored before (durable and recorded); the part in flight leaves nothing. So does one that
sends nothing for ``web.stow_idle_timeout_s``: the request ends there, its series are
released. Every request is an audit record (``stow_received``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from dicom_node import audit
from dicom_node.ingest import ReceivePath
from dicom_node.records import Origin
from dicom_node.stow_parts import (
    DICOM,
    MalformedBody,
    Part,
    PartReader,
    UnsupportedMediaType,
    boundary_of,
    with_preamble,
)
from dicom_node.stow_response import (
    CANNOT_UNDERSTAND,
    JSON_TYPE,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    RETRY_AFTER_S,
    XML_TYPE,
    PartOutcome,
    choose_media_type,
    failed_part,
    http_status,
    of_ingested,
    render,
    response_dataset,
    summary,
    warning_headers,
)
from dicom_node.web.auth import Principal, audit_record, client_address, require_operator
from kernel.uids import InvalidUIDError, require_uid

log = logging.getLogger("dicom_node.web.stow")
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

StudyUid = Annotated[
    str, Path(max_length=64, description="the Study Instance UID every instance must have")
]


@router.post("/studies")
async def store_instances(request: Request, who: Principal = Depends(require_operator)) -> Response:
    """STOW-RS: store the instances of a ``multipart/related; type="application/dicom"``
    body, of any study (PS3.18 10.5)."""
    return await _stow(request, who, None)


@router.post("/studies/{study_uid}")
async def store_study_instances(
    request: Request, study_uid: StudyUid, who: Principal = Depends(require_operator)
) -> Response:
    """STOW-RS: store the instances of the body that belong to ``study_uid``; an
    instance of another study fails (0xC409) and the others are stored."""
    try:
        uid = require_uid(study_uid, "the study UID of the URL")
    except InvalidUIDError as exc:
        raise HTTPException(400, str(exc)) from None
    return await _stow(request, who, uid)


async def _stow(request: Request, who: Principal, study_uid: str | None) -> Response:
    node = request.app.state.service
    intake = node.intake
    if intake is None:
        raise HTTPException(503, "STOW-RS is not available: this view of the node has no spool")
    media_type = choose_media_type(request.headers.get("accept"))
    if media_type is None:
        raise HTTPException(406, f"the Store Instances Response is {JSON_TYPE} or {XML_TYPE}")
    try:
        boundary = boundary_of(request.headers.get("content-type"))
    except UnsupportedMediaType as exc:
        raise HTTPException(415, str(exc)) from None
    except MalformedBody as exc:
        raise HTTPException(400, str(exc)) from None

    reader = PartReader(boundary, intake.spool.tmp_dir, node.settings.web.stow_max_instance_bytes)
    origin = Origin(who.username[:16], node.settings.ae_title, client_address(request))
    outcomes: list[PartOutcome] = []
    problem: str | None = None
    disconnected = False
    started = time.monotonic()
    idle_s = node.settings.web.stow_idle_timeout_s
    with intake.carrier(origin, study_uid) as path:
        try:
            async for chunk in _within(request.stream(), idle_s):
                for part in reader.feed(chunk):
                    outcomes.append(await run_in_threadpool(_store_part, path, part))
                if reader.error is not None:
                    break
            reader.finish()
        except MalformedBody as exc:
            problem = str(exc)
        except ClientDisconnect:
            disconnected = True
            problem = f"the client disconnected after {reader.body_bytes} bytes"
        except TimeoutError:
            disconnected = True
            problem = (
                f"the client sent nothing for {idle_s:g} s after {reader.body_bytes} bytes "
                "(web.stow_idle_timeout_s)"
            )
        finally:
            reader.close()
    seconds = time.monotonic() - started

    status = http_status(outcomes, malformed=problem is not None)
    facts = summary(outcomes)
    log.info(
        "STOW-RS by %s from %s%s: %d parts, %d stored, %d failed, %d bytes in %.1f s -> %d%s",
        who.username,
        origin.address,
        f" to study {study_uid}" if study_uid else "",
        facts["parts"],
        facts["stored"],
        facts["failed"],
        reader.body_bytes,
        seconds,
        status,
        f" ({problem})" if problem else "",
    )
    studies = facts["study_uids"]
    await run_in_threadpool(
        audit_record,
        request,
        who,
        audit.Action.STOW_RECEIVED,
        outcome=audit.Outcome.SUCCESS if facts["stored"] else audit.Outcome.FAILURE,
        object_type="stow",
        object_id=f"POST {request.url.path}",
        study_uid=study_uid or (studies[0] if len(studies) == 1 else None),
        detail={
            **facts,
            "status": status,
            "bytes": reader.body_bytes,
            "seconds": round(seconds, 3),
            **({"problem": problem} if problem else {}),
            **({"disconnected": True} if disconnected else {}),
        },
    )
    if not outcomes:  # nothing of the body was read: a plain error like the rest of the API
        raise HTTPException(400, problem or "the request held no instance")
    response = Response(
        render(response_dataset(outcomes), media_type), status_code=status, media_type=media_type
    )
    for value in warning_headers(outcomes, [problem] if problem else []):
        response.headers.append("Warning", value)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def _within(chunks: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """``chunks`` as they come; ``TimeoutError`` when the next one takes longer than
    ``idle_s`` (a stalled or half-open client must not hold its series open for ever)."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        yield chunk


def _store_part(path: ReceivePath, part: Part) -> PartOutcome:
    """One complete part through the receive path (runs in a worker thread: parsing,
    fsync and the database). Never raises: a failure is the part's outcome."""
    try:
        if part.problem is not None:
            return failed_part(
                part.index,
                part.head,
                OUT_OF_RESOURCES,
                f"not stored: {part.problem}",
                retry_later=part.disk_full,
            )
        media = part.media_type
        if media not in (None, DICOM):
            return failed_part(
                part.index, part.head, CANNOT_UNDERSTAND, f"the part is {media}, not {DICOM}"
            )
        return of_ingested(part.index, path.receive(with_preamble(part.data())), part.head)
    except Exception:
        log.exception("STOW-RS part %d failed", part.index)
        return failed_part(
            part.index, part.head, PROCESSING_FAILURE, "the node failed on this part (its log)"
        )
    finally:
        part.close()
