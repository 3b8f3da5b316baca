"""The Files API's storage: one directory (``--files-dir``; a volume shared by the replicas).

``<dir>/<owner>/<file id>`` holds a file's bytes and ``<dir>/<owner>/<file id>.json`` its
:class:`~gateway.batch.models.StoredFile` metadata; both are written to a temporary name and
renamed (a reader sees a whole file or none). A file belongs to the API key that uploaded it
(or whose batch produced it; ``owner`` is a hash of the key): other keys get 404, as for an id
that does not exist. What one key keeps is bounded (``--max-files-per-key``,
``--max-file-bytes-per-key``) and every file expires (``expires_at``: OpenAI's
``expires_after``, else ``--file-expiry``); :meth:`FileStore.expire` deletes what expired.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import BinaryIO

from gateway.batch.models import FileDeleted, FileList, StoredFile, cursor_page
from gateway.errors import APIError

_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_OWNER = re.compile(r"^[0-9a-f]{16}$")
#: Purposes a client may upload (batch input); outputs are ``batch_output``.
UPLOAD_PURPOSES = ("batch",)
#: ``expires_after[seconds]`` bounds, as OpenAI's Files API takes them (1 hour to 30 days).
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 30 * 86400


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def owner_of(api_key: str) -> str:
    """The owner name of an API key: a hash, so that metadata never holds the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class FileStore:
    """Files in ``root`` (created if missing), a directory per owner. Blocking disk work runs
    in a thread. ``max_bytes``: one upload; ``max_files`` / ``max_owner_bytes``: what one owner
    keeps; ``expiry_seconds``: a file's life unless its upload asked for less."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        max_files: int = 10_000,
        max_owner_bytes: int = 10 * 1024**3,
        expiry_seconds: float = 30 * 86400.0,
    ):
        self.root = root
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_owner_bytes = max_owner_bytes
        self.expiry_seconds = expiry_seconds
        root.mkdir(parents=True, exist_ok=True)
        self._move_old_layout()

    def _dir(self, owner: str) -> Path:
        return self.root / owner

    def _data(self, file_id: str, owner: str) -> Path:
        return self.root / owner / file_id

    def _meta(self, file_id: str, owner: str) -> Path:
        return self.root / owner / f"{file_id}.json"

    def _move_old_layout(self) -> None:
        """Files of a gateway from before the per-owner directories (``<dir>/<file id>``) go
        to their owner's directory."""
        for meta_path in self.root.glob("file-*.json"):
            try:
                meta = StoredFile.model_validate_json(meta_path.read_bytes())
            except (OSError, ValueError):
                continue
            self._dir(meta.owner).mkdir(exist_ok=True)
            data = self.root / meta.id
            if data.exists():
                os.replace(data, self._data(meta.id, meta.owner))
            os.replace(meta_path, self._meta(meta.id, meta.owner))

    def usage(self, owner: str) -> tuple[int, int]:
        """(files, bytes) ``owner`` keeps."""
        files, size = 0, 0
        try:
            entries = list(os.scandir(self._dir(owner)))
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            if _FILE_ID.match(entry.name):
                files += 1
                try:
                    size += entry.stat().st_size
                except FileNotFoundError:
                    files -= 1
        return files, size

    def _quota_error(self, owner: str, adding: int) -> APIError | None:
        files, size = self.usage(owner)
        if files >= self.max_files:
            why = f"it keeps {files} files (the limit is {self.max_files})"
        elif size + adding > self.max_owner_bytes:
            why = f"it keeps {size} bytes of files (the limit is {self.max_owner_bytes})"
        else:
            return None
        return APIError(
            429,
            f"This API key's file storage is full: {why}. Delete files, or wait for them to "
            "expire.",
            type="insufficient_quota",
            code="file_quota_exceeded",
        )

    async def upload(
        self,
        src: BinaryIO,
        filename: str,
        purpose: str,
        owner: str,
        expires_after: int | None = None,
    ) -> StoredFile:
        """Store an uploaded file (``src`` at its start), expiring ``expires_after`` seconds
        from now (at most ``expiry_seconds``). Raises APIError 400 for a purpose other than
        ``batch``, 413 over ``max_bytes``, 429 over the owner's quota."""
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(
                400,
                f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}; got '{purpose[:64]}'.",
                param="purpose",
            )
        quota = await asyncio.to_thread(self._quota_error, owner, 0)
        if quota is not None:
            raise quota
        file_id = new_file_id()
        self._dir(owner).mkdir(exist_ok=True)
        tmp = self._dir(owner) / f".{file_id}.upload"

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
            quota = await asyncio.to_thread(self._quota_error, owner, size)
            if quota is not None:
                raise quota
            os.replace(tmp, self._data(file_id, owner))
        finally:
            tmp.unlink(missing_ok=True)
        seconds = min(self.expiry_seconds, expires_after or self.expiry_seconds)
        return await asyncio.to_thread(
            self._describe, file_id, size, filename, purpose, owner, seconds
        )

    async def write_lines(
        self, file_id: str, parts: Iterable[Path], filename: str, purpose: str, owner: str
    ) -> StoredFile:
        """Store the concatenation of ``parts`` as ``file_id`` (an output file; writing the
        same id again replaces it). Outputs are not refused over the quota (the batch that
        makes them was accepted), but count toward it."""

        def join() -> int:
            self._dir(owner).mkdir(exist_ok=True)
            tmp = self._dir(owner) / f".{file_id}.write"
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                size = out.tell()
            os.replace(tmp, self._data(file_id, owner))
            return size

        size = await asyncio.to_thread(join)
        return await asyncio.to_thread(
            self._describe, file_id, size, filename, purpose, owner, self.expiry_seconds
        )

    def _describe(
        self, file_id: str, size: int, filename: str, purpose: str, owner: str, seconds: float
    ) -> StoredFile:
        now = int(time.time())
        meta = StoredFile(
            id=file_id,
            bytes=size,
            created_at=now,
            expires_at=now + int(seconds),
            filename=filename[:256],
            purpose=purpose,
            owner=owner,
        )
        tmp = self._dir(owner) / f".{file_id}.json"
        tmp.write_text(meta.model_dump_json())
        os.replace(tmp, self._meta(file_id, owner))
        return meta

    def get(self, file_id: str, owner: str) -> StoredFile:
        """The file's metadata; raises APIError 404 if there is no such file of ``owner`` (or
        it expired)."""
        meta = None
        if _FILE_ID.match(file_id) and _OWNER.match(owner):
            try:
                meta = StoredFile.model_validate_json(self._meta(file_id, owner).read_bytes())
            except FileNotFoundError:
                meta = None
        if meta is None or meta.owner != owner or _expired(meta, time.time()):
            raise APIError(
                404,
                f"No such File object: {file_id[:64]}",
                param="file_id",
                code="file_not_found",
            )
        return meta

    def path(self, file_id: str, owner: str) -> tuple[StoredFile, Path]:
        """The file's metadata and where its bytes are; raises APIError 404 as :meth:`get`."""
        return self.get(file_id, owner), self._data(file_id, owner)

    def delete(self, file_id: str, owner: str) -> FileDeleted:
        self.get(file_id, owner)
        self.remove(file_id, owner)
        return FileDeleted(id=file_id, deleted=True)

    def remove(self, file_id: str, owner: str) -> None:
        """Delete a file if it is there (no error otherwise)."""
        if _FILE_ID.match(file_id) and _OWNER.match(owner):
            self._meta(file_id, owner).unlink(missing_ok=True)
            self._data(file_id, owner).unlink(missing_ok=True)

    def page(
        self, owner: str, purpose: str | None, limit: int, after: str | None, order: str
    ) -> FileList:
        """``owner``'s files, newest first (``order="desc"``, OpenAI's default) or oldest
        first, ``limit`` after the file ``after`` (cursor pagination). Reads only ``owner``'s
        directory."""
        files = []
        now = time.time()
        for meta_path in self._dir(owner).glob("file-*.json") if _OWNER.match(owner) else []:
            try:
                meta = StoredFile.model_validate_json(meta_path.read_bytes())
            except (OSError, ValueError):
                continue
            wanted = purpose is None or meta.purpose == purpose
            if meta.owner == owner and wanted and not _expired(meta, now):
                files.append(meta)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        page, more = cursor_page(files, after, limit)
        return FileList(
            data=[f.wire() for f in page],
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=more,
        )

    def expire(self, now: float, keep: Collection[str] = ()) -> int:
        """Delete every file whose ``expires_at`` passed (but those in ``keep``: the input
        files of running batches); returns how many."""
        gone = 0
        for meta_path in self.root.glob("*/file-*.json"):
            try:
                meta = StoredFile.model_validate_json(meta_path.read_bytes())
            except (OSError, ValueError):
                continue
            if _expired(meta, now) and meta.id not in keep:
                self.remove(meta.id, meta.owner)
                gone += 1
        return gone


def _expired(meta: StoredFile, now: float) -> bool:
    return meta.expires_at is not None and meta.expires_at <= now
