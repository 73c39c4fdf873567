"""`import`: add the images of a folder under the server's dataset root, or of an uploaded zip
or tar archive, to a gallery (the `cpu` queue), labelled by their folder names.

The archive reader trusts nothing in the archive: member names are only reported and used as
labels, never as paths; every read is capped, and a tar's whole decompressed stream counts
toward the job's byte budget, so an archive bomb stops at the limit."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from pydantic import Field
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services.errors import Invalid, ServiceError
from app.services.galleries import get_gallery
from app.services.jobs.base import (
    ARCHIVE_FILE,
    CPU_QUEUE,
    JobKind,
    JobParams,
    RowId,
    folder_under_root,
    job_dir,
    must_exist,
)
from training.data.readers import is_image_file

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

TYPE = "import"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = (
    "import: gallery_id, folder, label_from_folder; or POST /jobs/import with an "
    "archive (result: counts and per-file results)"
)

IMPORT_BATCH = 32  # files decoded and embedded together by an import job
IMPORT_BATCHES_IN_FLIGHT = 2  # one decoding while the other embeds


class UnsupportedArchive(ServiceError):
    status_code = 415


class ImportParams(JobParams):
    gallery_id: RowId
    folder: str | None = Field(None, description="a folder under the server's dataset root")
    label_from_folder: bool = Field(True, description="label = the file's parent folder name")
    archive: bool = Field(False, description="set by POST /jobs/import (an uploaded archive)")


def validate(session: Session, settings: Settings, params: ImportParams) -> None:
    must_exist(get_gallery, session, params.gallery_id)
    if params.archive == (params.folder is not None):
        raise Invalid("an import job takes either a folder or an uploaded archive")
    if params.folder is not None:
        folder_under_root(settings, params.folder)


def check_archive(archive: BinaryIO) -> None:
    """A zip or a tar (plain or compressed) file; 415 otherwise."""
    recognised = False
    for is_kind in (zipfile.is_zipfile, tarfile.is_tarfile):
        archive.seek(0)
        recognised = recognised or is_kind(archive)
    archive.seek(0)
    if not recognised:
        raise UnsupportedArchive(
            "the upload is neither a zip nor a tar archive (.zip, .tar, .tar.gz, .tar.bz2, "
            ".tar.xz); pack the images into one of those"
        )


class _BudgetExceeded(Exception):
    """The import read past `import_max_bytes` (raised by `_CountingReader`)."""


class _Budget:
    """Import limits: files, and every decompressed byte (archive bombs), per job."""

    def __init__(self, settings: Settings) -> None:
        self.files_left = settings.import_max_files
        self.bytes_left = settings.import_max_bytes
        self.max_bytes = settings.import_max_bytes
        self.per_file = settings.max_upload_bytes
        self.stopped: str | None = None

    def take_file(self) -> bool:
        if self.files_left <= 0:
            self.stopped = "stopped at the import_max_files limit"
            return False
        self.files_left -= 1
        return True

    def consume(self, size: int) -> None:
        self.bytes_left -= size
        if self.bytes_left < 0:
            self.bytes_left = 0
            self.stopped = (
                f"stopped at the import_max_bytes limit: more than {self.max_bytes:,} bytes "
                "decompressed (members skipped or not)"
            )
            raise _BudgetExceeded(self.stopped)

    def read(self, handle: IO[bytes], *, counted: bool = False) -> bytes | str:
        """The file's bytes, or why it was refused; never reads more than the limits allow.
        `counted`: the handle's bytes already count (a tar stream read through
        `_CountingReader`)."""
        limit = self.per_file if counted else min(self.per_file, self.bytes_left)
        data = handle.read(limit + 1)
        if len(data) > limit:
            if limit < self.per_file:
                self.stopped = "stopped at the import_max_bytes limit"
                self.bytes_left = 0
                return "not read: the import's total size limit was reached"
            return f"larger than the {self.per_file:,}-byte limit per image"
        if not counted:
            self.bytes_left -= len(data)
        return data


class _CountingReader(io.RawIOBase):
    """A decompressed stream that charges every byte read, skipped members included, to the
    import's budget: a small archive that inflates to gigabytes stops at the budget."""

    def __init__(self, stream: IO[bytes], budget: _Budget) -> None:
        self.stream = stream
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # a writable buffer, as RawIOBase passes it
        data = self.stream.read(len(buffer))
        self.budget.consume(len(data))
        buffer[: len(data)] = data
        return len(data)


def _readable_text(name: str) -> str:
    """A member name as text that every database and JSON encoder accepts: names that are not
    valid UTF-8 (tar keeps their bytes as surrogate escapes) get U+FFFD where bytes were bad."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\x00", "")


def _label(name: PurePosixPath, by_folder: bool) -> str | None:
    """The name of the folder holding the file (None at the top level or when not asked)."""
    folder = name.parent.name
    return folder if by_folder and folder not in ("", ".", "..") else None


def _folder_files(
    settings: Settings, params: ImportParams, budget: _Budget
) -> tuple[int, Iterator[tuple[str, str | None, bytes | str]]]:
    """(how many image files, the files) of a folder under the dataset root."""
    root = folder_under_root(settings, ".")
    folder = folder_under_root(settings, params.folder or "")
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and is_image_file(p)]

    def files() -> Iterator[tuple[str, str | None, bytes | str]]:
        for path in paths:
            if not budget.take_file():
                return
            relative = PurePosixPath(_readable_text(path.relative_to(folder).as_posix()))
            label = _label(relative, params.label_from_folder)
            if not path.resolve().is_relative_to(root):
                yield str(relative), label, "a link leading out of the dataset root"
                continue
            with open(path, "rb") as handle:
                yield str(relative), label, budget.read(handle)
            if budget.stopped:
                return

    return len(paths), files()


def _archive_files(
    archive: Path, params: ImportParams, budget: _Budget
) -> tuple[int | None, Iterator[tuple[str, str | None, bytes | str]]]:
    """(how many image members, if known without reading it all, the members) of a zip or tar
    archive. Member names are only reported and used as labels, never as paths, so `../` or
    absolute names cannot write anywhere; links, devices and folders are skipped; every read
    is capped (a bomb's declared sizes are not trusted), and a tar's whole decompressed stream
    counts toward the import's byte budget."""
    total = None
    is_zip = zipfile.is_zipfile(archive)
    if is_zip:
        with _open_zip(archive) as bundle:
            names = [PurePosixPath(i.filename).name for i in bundle.infolist() if not i.is_dir()]
        total = sum(is_image_file(Path(name)) for name in names)

    def files() -> Iterator[tuple[str, str | None, bytes | str]]:
        members = _zip_members(archive) if is_zip else _tar_members(archive, budget)
        try:
            for raw_name, handle in members:
                name = _readable_text(raw_name)
                path = PurePosixPath(name)
                if not is_image_file(Path(path.name)):
                    continue
                if not budget.take_file():
                    return
                try:
                    data = (
                        handle
                        if isinstance(handle, str)
                        else budget.read(handle, counted=not is_zip)
                    )
                except (
                    zipfile.BadZipFile,
                    tarfile.TarError,
                    RuntimeError,
                    OSError,
                    EOFError,
                ) as error:
                    data = f"unreadable archive member: {error}"
                yield name, _label(path, params.label_from_folder), data
                if budget.stopped:
                    return
        except _BudgetExceeded:
            return
        except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as error:
            budget.stopped = f"stopped: the rest of the archive cannot be read ({error})"

    return total, files()


def _open_zip(archive: Path) -> zipfile.ZipFile:
    """zipfile decodes every name when it opens the archive, strictly when the archive says
    they are UTF-8: such an archive that lies cannot be read member by member."""
    try:
        return zipfile.ZipFile(archive)
    except UnicodeDecodeError as error:
        raise Invalid(
            f"the zip archive flags its member names as UTF-8 but one is not ({error.reason}); "
            "re-create it, or upload a tar archive"
        ) from None


def _zip_members(archive: Path) -> Iterator[tuple[str, IO[bytes] | str]]:
    with _open_zip(archive) as bundle:
        for info in bundle.infolist():
            if info.is_dir():
                continue
            try:
                handle = bundle.open(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError) as error:
                yield info.filename, f"unreadable archive member: {error}"  # e.g. encrypted
                continue
            with handle:
                yield info.filename, handle


# Compressed tar formats by their first bytes, and the module that decompresses each.
_DECOMPRESSORS: tuple[tuple[bytes, Any], ...] = (
    (b"\x1f\x8b", gzip),
    (b"BZh", bz2),
    (b"\xfd7zXZ\x00", lzma),
)


def _tar_members(archive: Path, budget: _Budget) -> Iterator[tuple[str, IO[bytes] | str]]:
    """A tar's members in stream mode over the decompressed bytes, each one counted."""
    with open(archive, "rb") as head:
        magic = head.read(6)
    module = next((m for prefix, m in _DECOMPRESSORS if magic.startswith(prefix)), None)
    with (
        module.open(archive, "rb") if module else open(archive, "rb") as raw,
        io.BufferedReader(_CountingReader(raw, budget), 1024 * 1024) as counted,
        tarfile.open(fileobj=counted, mode="r|") as bundle,
    ):
        for member in bundle:
            handle = bundle.extractfile(member) if member.isfile() else None
            if handle is not None:
                yield member.name, handle
            # tarfile keeps every header it read (millions for tiny members): forget them.
            bundle.members = []  # type: ignore[attr-defined]  # undocumented, in every version


def body(run: JobRun) -> dict[str, Any]:
    params = ImportParams.model_validate(run.job.params)
    budget = _Budget(run.settings)
    if not params.archive:
        return _import_files(run, params, budget, *_folder_files(run.settings, params, budget))
    archive = job_dir(run.settings, run.id) / ARCHIVE_FILE
    try:
        return _import_files(run, params, budget, *_archive_files(archive, params, budget))
    finally:  # whatever the outcome (done, failed, cancelled): the upload is not kept
        archive.unlink(missing_ok=True)


def _import_files(
    run: JobRun,
    params: ImportParams,
    budget: _Budget,
    total: int | None,
    files: Iterator[tuple[str, str | None, bytes | str]],
) -> dict[str, Any]:
    """Add `files` (name, label, bytes or why it was refused) in batches; the job's result."""
    from app.services.images import Upload, UploadResult, add_images

    total = None if total is None else min(total, run.settings.import_max_files)
    run.report(progress=0.0, step=0, total_steps=total, force=True)
    entries: list[dict[str, Any]] = []
    batch: list[tuple[str, str | None, bytes]] = []

    def add(files: list[tuple[str, str | None, bytes]]) -> list[UploadResult]:
        uploads = [Upload(data=data, filename=name, label=label) for name, label, data in files]
        with run.session() as session:
            return add_images(run.runtime, session, params.gallery_id, uploads)

    def record(results: list[UploadResult]) -> None:
        for result in results:
            status = "rejected" if result.error else "duplicate" if result.duplicate else "added"
            entries.append(
                {
                    "name": result.filename,
                    "status": status,
                    "image_id": result.image.id if result.image else None,
                    "error": result.error,
                }
            )
        run.report(
            progress=len(entries) / total if total else None,
            step=len(entries),
            metrics=_counts(entries),
        )
        run.check()

    # Two batches in flight: one decodes and preprocesses while the other's forward pass runs
    # (the embedder batches both callers' images). Results are recorded in batch order.
    in_flight: deque[Future[list[UploadResult]]] = deque()
    prefix = f"import-{run.id}"
    with ThreadPoolExecutor(IMPORT_BATCHES_IN_FLIGHT, thread_name_prefix=prefix) as pool:
        try:
            for name, label, data in files:
                if isinstance(data, str):
                    entries.append(
                        {"name": name, "status": "rejected", "image_id": None, "error": data}
                    )
                    continue
                batch.append((name, label, data))
                if len(batch) >= IMPORT_BATCH:
                    in_flight.append(pool.submit(add, list(batch)))
                    batch.clear()
                    if len(in_flight) >= IMPORT_BATCHES_IN_FLIGHT:
                        record(in_flight.popleft().result())
            if batch:
                in_flight.append(pool.submit(add, list(batch)))
            while in_flight:
                record(in_flight.popleft().result())
        finally:
            # Cancelled or failed: leaving the pool waits for the batch still running, which
            # commits its images, so a cancelled import stops within two batches (64 files).
            for pending in in_flight:
                pending.cancel()
    return {
        "gallery_id": params.gallery_id,
        **_counts(entries),
        "stopped": budget.stopped,
        "files": entries,
    }


def _counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"added": 0, "duplicate": 0, "rejected": 0}
    for entry in entries:
        counts[entry["status"]] += 1
    return counts


KIND = JobKind(TYPE, CPU_QUEUE, ImportParams, body, DESCRIPTION, validate, check_archive)
