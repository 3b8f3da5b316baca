"""Client routes of OpenAI's Files and Batch APIs (API keys, checked by :mod:`gateway.http.edge`):
``/v1/files`` (upload, list, get, content, delete) and ``/v1/batches`` (create, list, get,
cancel). Thin handlers; the logic is in :mod:`gateway.batch.files` and :mod:`gateway.batch.batches`.
A file or batch belongs to the API key that made it: other keys get 404."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Form, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse

from gateway.api.models import json_response
from gateway.batch.batches import Batches
from gateway.batch.files import MAX_EXPIRY_SECONDS, MIN_EXPIRY_SECONDS, FileStore, owner_of
from gateway.batch.models import Batch, BatchCreate, BatchList, FileDeleted, FileList, FileObject
from gateway.errors import APIError
from gateway.http.auth import bearer_token

router = APIRouter(prefix="/v1")


async def _owner(request: Request) -> str:
    token = bearer_token(request.headers.get("authorization"))
    assert token is not None  # the edge let the request in
    return owner_of(token)


async def _files(request: Request) -> FileStore:
    files: FileStore = request.app.state.files
    return files


async def _batches(request: Request) -> Batches:
    batches: Batches = request.app.state.batches
    return batches


@router.post("/files", response_model=FileObject)
async def upload_file(
    file: UploadFile,
    purpose: str = Form(...),
    anchor: str | None = Form(None, alias="expires_after[anchor]"),
    seconds: int | None = Form(None, alias="expires_after[seconds]"),
    owner: str = Depends(_owner),
    files: FileStore = Depends(_files),
) -> Response:
    """Upload; OpenAI's ``expires_after`` (``anchor`` ``created_at``, ``seconds`` 3,600 to
    2,592,000) as its multipart fields."""
    if anchor not in (None, "created_at") or (seconds is None) != (anchor is None):
        raise APIError(
            400,
            "'expires_after' needs anchor 'created_at' and seconds.",
            param="expires_after",
        )
    if seconds is not None and not MIN_EXPIRY_SECONDS <= seconds <= MAX_EXPIRY_SECONDS:
        raise APIError(
            400,
            f"'expires_after.seconds' must be between {MIN_EXPIRY_SECONDS} and "
            f"{MAX_EXPIRY_SECONDS}.",
            param="expires_after",
        )
    name = file.filename or "upload.jsonl"
    stored = await files.upload(file.file, name, purpose, owner, expires_after=seconds)
    return json_response(stored.wire())


@router.get("/files", response_model=FileList)
def list_files(
    purpose: str | None = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    owner: str = Depends(_owner),
    files: FileStore = Depends(_files),
) -> Response:
    return json_response(files.page(owner, purpose, limit, after, order))


@router.get("/files/{file_id}", response_model=FileObject)
def get_file(
    file_id: str, owner: str = Depends(_owner), files: FileStore = Depends(_files)
) -> Response:
    return json_response(files.get(file_id, owner).wire())


@router.get("/files/{file_id}/content")
def file_content(
    file_id: str, owner: str = Depends(_owner), files: FileStore = Depends(_files)
) -> FileResponse:
    meta, path = files.path(file_id, owner)
    return FileResponse(path, media_type="application/octet-stream", filename=meta.filename)


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(
    file_id: str,
    owner: str = Depends(_owner),
    files: FileStore = Depends(_files),
    batches: Batches = Depends(_batches),
) -> Response:
    """Delete a file; 409 (``file_in_use``) while a running batch reads it."""
    files.get(file_id, owner)  # 404 first
    await batches.check_unused(file_id, owner)
    return json_response(files.delete(file_id, owner))


@router.post("/batches", response_model=Batch)
async def create_batch(
    req: BatchCreate, owner: str = Depends(_owner), batches: Batches = Depends(_batches)
) -> Response:
    return json_response(await batches.create(req, owner))


@router.get("/batches", response_model=BatchList)
async def list_batches(
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    owner: str = Depends(_owner),
    batches: Batches = Depends(_batches),
) -> Response:
    return json_response(await batches.page(owner, after, limit))


@router.get("/batches/{batch_id}", response_model=Batch)
async def get_batch(
    batch_id: str, owner: str = Depends(_owner), batches: Batches = Depends(_batches)
) -> Response:
    return json_response(await batches.get(batch_id, owner))


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(
    batch_id: str, owner: str = Depends(_owner), batches: Batches = Depends(_batches)
) -> Response:
    return json_response(await batches.cancel(batch_id, owner))
