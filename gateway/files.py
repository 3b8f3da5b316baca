"""The Files API's storage: one directory (``--files-dir``; a volume shared by the replicas).

``<dir>/<file id>`` holds a file's bytes and ``<dir>/<file id>.json`` its
:class:`~gateway.batch_models.StoredFile` metadata; both are written to a temporary name and
renamed (a reader sees a whole file or none). A file belongs to the API key that uploaded it
(or whose batch produced it): other keys get 404, as for an id that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from gateway.batch_models import FileDeleted, FileList, StoredFile, cursor_page
from gateway.errors import APIError

_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
#: Purposes a client may upload (batch input); outputs are ``batch_output``.
UPLOAD_PURPOSES = ("batch",)


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def owner_of(api_key: str) -> str:
    """The owner name of an API key: a hash, so that metadata never holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class FileStore:
    """Files in ``root`` (created if missing). Blocking disk work runs in a thread."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def _data(self, file_id: str) -> Path:
        return self.root / file_id

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    async def upload(self, src: BinaryIO, filename: str, purpose: str, owner: str) -> StoredFile:
        """Store an uploaded file (``src`` at its start). Raises APIError 400 for a purpose
        other than ``batch``, 413 over ``max_bytes``."""
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(
                400,
                f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}; got '{purpose}'.",
                param="purpose",
            )
        file_id = new_file_id()
        tmp = self.root / f".{file_id}.upload"

        def copy() -> int:
            with tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                return out.tell()

        try:
            size = await asyncio.to_thread(copy)
            if size > self.max_bytes:
                raise APIError(
                    413,
                    f"The file is {size} bytes; at most {self.max_bytes} bytes are accepted.",
                    param="file",
                    code="file_too_large",
                )
            os.replace(tmp, self._data(file_id))
        finally:
            tmp.unlink(missing_ok=True)
        return await asyncio.to_thread(self._describe, file_id, size, filename, purpose, owner)

    async def write_lines(
        self, file_id: str, parts: Iterable[Path], filename: str, purpose: str, owner: str
    ) -> StoredFile:
        """Store the concatenation of ``parts`` as ``file_id`` (an output file; writing the
        same id again replaces it)."""

        def join() -> int:
            tmp = self.root / f".{file_id}.write"
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                size = out.tell()
            os.replace(tmp, self._data(file_id))
            return size

        size = await asyncio.to_thread(join)
        return await asyncio.to_thread(self._describe, file_id, size, filename, purpose, owner)

    def _describe(
        self, file_id: str, size: int, filename: str, purpose: str, owner: str
    ) -> StoredFile:
        meta = StoredFile(
            id=file_id,
            bytes=size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            owner=owner,
        )
        tmp = self.root / f".{file_id}.json"
        tmp.write_text(meta.model_dump_json())
        os.replace(tmp, self._meta(file_id))
        return meta

    def get(self, file_id: str, owner: str) -> StoredFile:
        """The file's metadata; raises APIError 404 if there is no such file of ``owner``."""
        meta = None
        if _FILE_ID.match(file_id):
            try:
                meta = StoredFile.model_validate_json(self._meta(file_id).read_bytes())
            except FileNotFoundError:
                meta = None
        if meta is None or meta.owner != owner:
            raise APIError(
                404, f"No such File object: {file_id}", param="file_id", code="file_not_found"
            )
        return meta

    def path(self, file_id: str, owner: str) -> tuple[StoredFile, Path]:
        """The file's metadata and where its bytes are; raises APIError 404 as :meth:`get`."""
        return self.get(file_id, owner), self._data(file_id)

    def delete(self, file_id: str, owner: str) -> FileDeleted:
        self.get(file_id, owner)
        self._meta(file_id).unlink(missing_ok=True)
        self._data(file_id).unlink(missing_ok=True)
        return FileDeleted(id=file_id, deleted=True)

    def page(
        self, owner: str, purpose: str | None, limit: int, after: str | None, order: str
    ) -> FileList:
        """``owner``'s files, newest first (``order="desc"``, OpenAI's default) or oldest
        first, ``limit`` after the file ``after`` (cursor pagination)."""
        files = []
        for meta_path in self.root.glob("file-*.json"):
            try:
                meta = StoredFile.model_validate_json(meta_path.read_bytes())
            except (OSError, ValueError):
                continue
            if meta.owner == owner and (purpose is None or meta.purpose == purpose):
                files.append(meta)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        page, more = cursor_page(files, after, limit)
        return FileList(
            data=[f.wire() for f in page],
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=more,
        )
