"""Retrieving a study from a source: the JSON API and the page.

``GET /api/sources`` lists the configured sources (no credentials);
``GET /api/sources/{name}/studies`` searches one (C-FIND / QIDO-RS, operators: the answer
carries patient IDs, and a search by patient ID is audited with it);
``POST /api/retrievals`` asks for a study (operators; the retrieval loop carries it out,
``dicom_node.retriever``); ``GET /api/retrievals[/{id}]`` shows requests and their
progress. The Retrieve page (``/retrieve``, operators) is the studies page's form: search
a source, pick a study and pipelines, follow the progress.

A bad request answers 4xx naming the problem (unknown source or pipeline, a query that
names no study: 404 / 422); a source that cannot be asked answers 502 with the reason.
Forms get the same words back on the page they came from.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import Field

from dicom_node import audit, retrieve, sources
from dicom_node.retrieve import RetrieveError, StudyQuery
from dicom_node.web import api
from dicom_node.web.auth import (
    Principal,
    audit_record,
    html_page,
    require_operator,
    require_viewer,
)
from dicom_node.web.pages import render
from kernel.strict import StrictModel

log = logging.getLogger("dicom_node.web")
router = APIRouter(prefix="/api", tags=["retrieve"])
pages = APIRouter(include_in_schema=False, dependencies=[Depends(html_page)])

SourceName = Annotated[str, Path(max_length=64, description="a configured source's name")]
RetrieveId = Annotated[int, Path(ge=1, le=api.MAX_ID, description="a retrieve request's id")]
QueryUid = Annotated[str, Query(pattern=r"^[0-9.]{0,64}$", description="Study Instance UID")]
Accession = Annotated[str, Query(max_length=16, description="AccessionNumber")]
PatientId = Annotated[str, Query(max_length=64, description="PatientID")]
QueryDate = Annotated[
    str, Query(pattern=r"^(\d{8}|\d{4}-\d{2}-\d{2})?$", description="YYYYMMDD or YYYY-MM-DD")
]


class RetrieveBody(StrictModel):
    """``POST /api/retrievals``: the source, one way to name the study, the pipelines."""

    source: str = Field(max_length=64)
    study_uid: str | None = Field(None, max_length=64)
    accession_number: str | None = Field(None, max_length=16)
    patient_id: str | None = Field(None, max_length=64)
    date_from: str | None = Field(None, max_length=10)
    date_to: str | None = Field(None, max_length=10)
    pipelines: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=32)


def _node(request: Request) -> Any:
    return request.app.state.service


def _source(request: Request, name: str) -> Any:
    """The configured source ``name``; 404 naming the configured ones otherwise."""
    try:
        return _node(request).settings.source(name)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from None


def _catalog(request: Request) -> dict[str, Any]:
    rules = _node(request).rules
    return dict(rules.get().pipelines) if rules is not None else {}


def search(request: Request, who: Principal, name: str, query: StudyQuery) -> dict[str, Any]:
    """Ask source ``name`` for the studies matching ``query`` (audited, with the patient
    ID of a patient ID search); 404 unknown source, 502 the source's failure."""
    _source(request, name)
    node = _node(request)

    def trail(outcome: audit.Outcome, detail: dict[str, Any]) -> None:
        audit_record(
            request,
            who,
            audit.Action.SOURCE_SEARCHED,
            outcome=outcome,
            object_type="source",
            object_id=name,
            study_uid=query.study_uid,
            patient_id=query.patient_id,
            detail={"query": query.describe(), **detail},
        )

    try:
        found = sources.client_for(node.settings, name).find_studies(query)
    except sources.SourceError as exc:
        trail(audit.Outcome.FAILURE, {"reason": str(exc)})
        raise HTTPException(502, str(exc)) from None
    trail(audit.Outcome.SUCCESS, {"found": len(found)})
    with node.db.session() as s:
        known = retrieve.known_studies(s, [x.study_uid for x in found])
    return {
        "source": name,
        "query": query.describe(who.sees_patient_ids),
        "studies": [
            {**x.as_dict(who.sees_patient_ids), "in_node": x.study_uid in known} for x in found
        ],
    }


def request_retrieval(request: Request, who: Principal, body: RetrieveBody) -> dict[str, Any]:
    """Create a retrieve request (audited) and wake the retrieval loop; 404 unknown source,
    422 a bad query or an unknown pipeline."""
    _source(request, body.source)
    node = _node(request)
    try:
        query = retrieve.parse_query(
            body.study_uid, body.accession_number, body.patient_id, body.date_from, body.date_to
        )
        pipelines = retrieve.check_pipelines(body.pipelines, _catalog(request))
    except RetrieveError as exc:
        raise HTTPException(422, str(exc)) from None
    request_id = retrieve.create(node.db, body.source, query, pipelines, who.username)
    audit_record(
        request,
        who,
        audit.Action.RETRIEVE_REQUESTED,
        object_type="retrieve",
        object_id=request_id,
        study_uid=query.study_uid,
        patient_id=query.patient_id,
        detail={"source": body.source, "query": query.describe(), "pipelines": pipelines},
    )
    if node.wake_retriever is not None:
        node.wake_retriever()
    wanted = ", ".join(pipelines) if pipelines else "the rules' choice"
    message = (
        f"retrieve #{request_id}: {query.describe(who.sees_patient_ids)} asked for from "
        f"{body.source}; pipelines: {wanted}"
    )
    log.info(
        "user %s: retrieve #%d from %s (%s)",
        who.username,
        request_id,
        body.source,
        query.describe(),
    )
    return {
        "ok": True,
        "id": request_id,
        "state": "requested",
        "message": message,
        "url": f"/api/retrievals/{request_id}",
    }


# -- API ----------------------------------------------------------------------------------


@router.get("/sources")
def list_sources(request: Request, _: Principal = Depends(require_viewer)) -> dict[str, Any]:
    """The configured sources: name, kind, where and how (no credentials)."""
    return {"sources": [sources.source_dict(x) for x in _node(request).settings.sources]}


@router.get("/sources/{name}/studies")
def search_source(
    request: Request,
    name: SourceName,
    study_uid: QueryUid = "",
    accession_number: Accession = "",
    patient_id: PatientId = "",
    date_from: QueryDate = "",
    date_to: QueryDate = "",
    who: Principal = Depends(require_operator),
) -> dict[str, Any]:
    """Studies of the source matching one of: a Study Instance UID, an accession number,
    a patient ID (with an optional study date range)."""
    _source(request, name)
    try:
        query = retrieve.parse_query(study_uid, accession_number, patient_id, date_from, date_to)
    except RetrieveError as exc:
        raise HTTPException(422, str(exc)) from None
    return search(request, who, name, query)


async def _body(request: Request) -> tuple[RetrieveBody, bool]:
    """The request body (JSON or a form) and whether it came from a form."""
    if request.headers.get("content-type", "").startswith("application/json"):
        return await api._json_model(request, RetrieveBody), False
    form = await request.form()
    fields = {
        k: str(form.get(k) or "").strip() or None
        for k in ("study_uid", "accession_number", "patient_id", "date_from", "date_to")
    }
    try:
        body = RetrieveBody(
            source=str(form.get("source") or ""),
            pipelines=[str(p) for p in form.getlist("pipelines")] or None,
            **fields,
        )
    except ValueError as exc:
        raise HTTPException(422, f"bad form: {exc}") from None
    return body, True


@router.post("/retrievals", status_code=202)
async def create_retrieval(
    request: Request, who: Principal = Depends(require_operator)
) -> Response:
    """Ask a source for a study; body ``{"source", "study_uid" | "accession_number" |
    "patient_id" (+ "date_from", "date_to"), "pipelines": [...]}`` (no pipelines: the
    routing rules choose). Answers 202 with the request's id; follow it at
    ``/api/retrievals/{id}``."""
    body, from_form = await _body(request)
    if not from_form:
        return JSONResponse(request_retrieval(request, who, body), 202)
    target = str((await request.form()).get("next") or "/retrieve")
    if not target.startswith("/") or target.startswith("//"):
        target = "/retrieve"
    try:
        message = request_retrieval(request, who, body)["message"]
    except HTTPException as exc:
        message = f"not retrieved: {exc.detail}"
    sep = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{sep}msg={quote(message)}", 303)


@router.get("/retrievals")
def list_retrievals(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    who: Principal = Depends(require_viewer),
) -> dict[str, Any]:
    """Retrieve requests, newest first, with their state and progress."""
    with _node(request).db.session() as s:
        rows = retrieve.recent(s, limit)
        return {"items": [retrieve.as_dict(r, who.sees_patient_ids) for r in rows]}


@router.get("/retrievals/{retrieve_id}")
def get_retrieval(
    request: Request, retrieve_id: RetrieveId, who: Principal = Depends(require_viewer)
) -> dict[str, Any]:
    """One retrieve request: state (requested, querying, retrieving, received, failed),
    the reason of a failure, instances expected / received / failed."""
    with _node(request).db.session() as s:
        row = retrieve.get(s, retrieve_id)
        if row is None:
            raise HTTPException(404, f"retrieve request {retrieve_id} does not exist")
        return retrieve.as_dict(row, who.sees_patient_ids)


# -- page ---------------------------------------------------------------------------------


@pages.get("/retrieve")
def retrieve_page(
    request: Request,
    source: Annotated[str, Query(max_length=64)] = "",
    study_uid: QueryUid = "",
    accession_number: Accession = "",
    patient_id: PatientId = "",
    date_from: QueryDate = "",
    date_to: QueryDate = "",
    who: Principal = Depends(require_operator),
) -> Response:
    """Search a source, pick a study and pipelines, follow the requests' progress."""
    node = _node(request)
    form = {
        "source": source,
        "study_uid": study_uid,
        "accession_number": accession_number,
        "patient_id": patient_id,
        "date_from": date_from,
        "date_to": date_to,
    }
    found, error = None, None
    if any(v for k, v in form.items() if k != "source"):
        try:
            query = retrieve.parse_query(
                study_uid, accession_number, patient_id, date_from, date_to
            )
            found = search(request, who, source, query)
        except RetrieveError as exc:
            error = str(exc)
        except HTTPException as exc:
            error = str(exc.detail)
    with node.db.session() as s:
        items = [retrieve.as_dict(r, who.sees_patient_ids) for r in retrieve.recent(s, 20)]
    return render(
        request,
        "retrieve.html",
        who,
        "Retrieve",
        sources=[sources.source_dict(x) for x in node.settings.sources],
        form=form,
        found=found,
        error=error,
        pipelines=sorted(_catalog(request)),
        retrievals=items,
        refresh=found is None and any(i["active"] for i in items),
    )
