"""Wire models of OpenAI's Files and Batch APIs, field for field, so that the ``openai`` SDK
works unchanged (``client.files.create(purpose="batch")``, ``client.batches.create(...)``,
``client.files.content(output_file_id)``).

Sources: OpenAI API reference, "Files" (the File object, list, delete) and "Batch" (the Batch
object, its request input and output lines); the ``openai`` package's ``types/batch.py`` and
``types/file_object.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.queue.store import BatchIndex

#: A batch's states, in OpenAI's words. Terminal: failed, completed, expired, cancelled.
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
#: Endpoints a batch may target.
BatchEndpoint = Literal["/v1/embeddings", "/v1/rerank"]


class FileObject(BaseModel):
    """A file of the Files API (``GET /v1/files/{id}``)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class StoredFile(FileObject):
    """A file's metadata on disk: the wire object plus the API key that owns it (a hash)."""

    owner: str

    def wire(self) -> FileObject:
        return FileObject.model_validate(self.model_dump(exclude={"owner"}))


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    """One problem of a batch that failed validation (``line`` is 1-based)."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[StrictStr, Field(max_length=64)]
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    #: Up to 16 pairs; keys up to 64 characters, values up to 512 (OpenAI's limits).
    metadata: (
        dict[
            Annotated[StrictStr, Field(max_length=64)],
            Annotated[StrictStr, Field(max_length=512)],
        ]
        | None
    ) = Field(default=None, max_length=16)


class Batch(BaseModel):
    """The Batch object (``GET /v1/batches/{id}``)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    metadata: dict[str, str] | None = None
    model: str | None = None


class BatchRecord(Batch):
    """A batch as the queue store keeps it: the wire object plus the owning API key (a hash)."""

    owner: str

    def wire(self) -> Batch:
        return Batch.model_validate(self.model_dump(exclude={"owner"}))

    def index(self) -> BatchIndex:
        """What the queue store finds the record by: owner, creation, and its end (the time
        of its terminal status; None while it runs)."""
        ended = {
            "completed": self.completed_at,
            "failed": self.failed_at,
            "expired": self.expired_at,
            "cancelled": self.cancelled_at,
        }
        ended_at = (ended[self.status] or self.created_at) if self.status in TERMINAL else None
        return BatchIndex(self.owner, self.created_at, ended_at)


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchInputLine(BaseModel):
    """One line of a batch input file: ``{"custom_id", "method": "POST", "url", "body"}``."""

    model_config = ConfigDict(extra="forbid")

    custom_id: StrictStr = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: StrictStr
    body: dict[str, Any]


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchLineError(BaseModel):
    code: str
    message: str


class BatchOutputLine(BaseModel):
    """One line of a batch's output or error file: the input line's ``custom_id`` with the
    endpoint's response (status 200 in the output file, 4xx/5xx in the error file), or an
    ``error`` where no request was made (e.g. ``batch_expired``, ``batch_cancelled``)."""

    id: str
    custom_id: str
    response: BatchResponse | None = None
    error: BatchLineError | None = None


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


Page = TypeVar("Page", bound=_Identified)


def cursor_page(items: list[Page], after: str | None, limit: int) -> tuple[list[Page], bool]:
    """OpenAI's cursor pagination over ``items`` (already in list order): up to ``limit`` of
    those after the one whose id is ``after`` (none if it is unknown), and whether more
    follow."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit
