"""Adding, listing and deleting a gallery's images.

The upload path (durability design): decode and validate every file, embed the good ones,
write each to a server-generated name (fsync), then commit image + embedding rows in one
transaction, and only then apply them to the in-memory index and acknowledge. A crash before
the commit leaves at most an unreferenced file; after it, start-up replay restores the index.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Gallery, Image, ImageEmbedding, Model
from app.embedder import BatchingEmbedder
from app.imaging import (
    ImageRejected,
    content_hash,
    open_upload,
    sniff_content_type,
)
from app.imaging import thumbnail_bytes as make_thumbnail
from app.pipeline import prefetch
from app.services.errors import Conflict, NotFound, ServiceError
from app.services.galleries import get_gallery, missing_embeddings
from app.services.index_backend import IndexRows
from app.services.models import embedder_for, get_model
from app.services.runtime import Runtime
from training.fsutil import fsync_dir

# Sub-folder of a gallery's upload folder that holds its cached thumbnails.
THUMBNAILS_FOLDER = "thumbnails"

# File name extension of each accepted format (app.imaging.ACCEPTED_FORMATS).
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}


@dataclass
class Upload:
    """One file of an upload request, with what the caller says about it."""

    data: bytes
    filename: str | None = None  # the client's name: echoed in the result, never used as a path
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None


@dataclass
class UploadResult:
    """Per-file outcome: the image (new or the existing duplicate) or the error."""

    filename: str | None
    image: Image | None = None
    duplicate: bool = False
    error: str | None = None
    status_code: int = 201


@dataclass
class _Decoded:
    """A valid upload, kept as the model's input tensor (never as the decoded image, so a
    request of many large files holds one decoded image at a time)."""

    position: int
    upload: Upload
    width: int
    height: int
    digest: str
    content_type: str
    extension: str
    tensor: torch.Tensor
    file_name: str = ""


def get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"image {image_id} does not exist")
    return image


def image_path(settings: Settings, image: Image) -> Path:
    return settings.uploads_dir / image.file_name


def thumbnail_path(settings: Settings, image: Image) -> Path:
    """Where the image's thumbnail is cached: beside the gallery's files (deleted with them),
    one folder per thumbnail size."""
    name = Path(image.file_name)
    return (
        settings.uploads_dir
        / name.parent
        / THUMBNAILS_FOLDER
        / str(settings.thumbnail_size)
        / f"{name.stem}.jpg"
    )


def thumbnail(runtime: Runtime, image: Image) -> bytes:
    """The image's JPEG thumbnail, made on first request and cached on disk: an image is
    decoded (at a reduced size, within the decode budget) once, not on every view."""
    settings = runtime.settings
    path = thumbnail_path(settings, image)
    with suppress(FileNotFoundError):  # read, not just found: a delete may come in between
        return path.read_bytes()
    original = image_path(settings, image)
    try:
        data = original.read_bytes()
    except FileNotFoundError as error:  # deleted since the row was read
        raise NotFound(f"image {image.id} does not exist") from error
    try:
        picture = open_upload(
            data,
            max_pixels=settings.max_image_pixels,
            min_side=settings.thumbnail_size,
            budget=runtime.decode_budget,
        )
    except ImageRejected as error:  # busy (503), or a stored file that no longer decodes
        raise ServiceError(error.detail, error.status_code) from error
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    thumb = make_thumbnail(picture, settings.thumbnail_size)
    temporary.write_bytes(thumb)
    os.replace(temporary, path)  # concurrent first views each write a whole file
    if not original.exists():  # deleted while it was made: leave no thumbnail behind
        path.unlink(missing_ok=True)
    return thumb


def sweep_orphan_files(runtime: Runtime) -> int:
    """Delete upload files that no image row names, thumbnails of images that are gone and
    folders of deleted galleries, all older than `Settings.orphan_grace_s` (an upload writes
    its files before its commit, possibly in another API process); returns how many files.

    They are what an upload killed between writing its files and committing leaves behind
    (`add_images` removes its own files when it fails; a SIGKILL skips that)."""
    settings = runtime.settings
    cutoff = time.time() - settings.orphan_grace_s
    removed = 0
    if not settings.uploads_dir.is_dir():
        return 0
    with runtime.session_factory() as session:
        for folder in settings.uploads_dir.iterdir():
            if not (folder.is_dir() and folder.name.isdigit()):
                continue
            names = {
                Path(name).name
                for name in session.scalars(
                    select(Image.file_name).where(Image.gallery_id == int(folder.name))
                )
            }
            stems = {Path(name).stem for name in names}
            for path in folder.rglob("*"):
                if not path.is_file() or path.stat().st_mtime > cutoff:
                    continue
                if THUMBNAILS_FOLDER in path.relative_to(folder).parts[:-1]:
                    orphan = path.stem not in stems  # also leftover temporary files
                else:
                    orphan = path.name not in names
                if orphan:
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def list_images(
    session: Session, gallery_id: int, *, label: str | None, offset: int, limit: int
) -> tuple[list[Image], int]:
    get_gallery(session, gallery_id)
    where = [Image.gallery_id == gallery_id]
    if label is not None:
        where.append(Image.label == label)
    total = session.scalar(select(func.count()).select_from(Image).where(*where)) or 0
    items = session.scalars(
        select(Image).where(*where).order_by(Image.id).offset(offset).limit(limit)
    ).all()
    return list(items), total


def add_images(
    runtime: Runtime, session: Session, gallery_id: int, uploads: list[Upload]
) -> list[UploadResult]:
    """Add files to a gallery; one bad file does not reject the others. A file whose content
    is already in the gallery returns the existing image (status 200, duplicate)."""
    settings = runtime.settings
    gallery = get_gallery(session, gallery_id)
    model = get_model(session, gallery.model_id)
    embedder = embedder_for(runtime, model)
    results = [UploadResult(filename=u.filename) for u in uploads]
    decoded: list[_Decoded] = []
    for position, upload in enumerate(uploads):
        problem = _text_problem(upload)
        if problem:
            results[position].error, results[position].status_code = problem, 422
            continue
        try:
            picture = decode_for_embedding(runtime, embedder, upload.data)
        except ImageRejected as error:
            results[position].error = error.detail
            results[position].status_code = error.status_code
            continue
        width, height = picture.info["source_size"]
        decoded.append(
            _Decoded(
                position,
                upload,
                width,
                height,
                content_hash(upload.data),
                sniff_content_type(picture),
                EXTENSIONS[picture.format or ""],
                embedder.prepare([picture])[0],
            )
        )
    pending = _resolve_duplicates(session, gallery_id, decoded, results)
    written: list[Path] = []
    committed: set[str] = set()
    try:
        for _ in range(3):
            if not pending:
                break
            if model.id != gallery.model_id:  # switched meanwhile: its preprocessing may differ
                model = get_model(session, gallery.model_id)
                embedder = embedder_for(runtime, model)
                for item in pending:
                    try:
                        picture = decode_for_embedding(runtime, embedder, item.upload.data)
                    except ImageRejected as error:  # decoded once already: only busy (503)
                        raise ServiceError(error.detail, error.status_code) from error
                    item.tensor = embedder.prepare([picture])[0]
            vectors = embedder.embed([d.tensor for d in pending])
            written += _write_files(settings, gallery_id, [d for d in pending if not d.file_name])
            try:
                created = _commit(runtime, session, gallery, model, pending, vectors)
            except IntegrityError:  # the same content committed concurrently: a duplicate now
                session.rollback()
                pending = _resolve_duplicates(session, gallery_id, pending, results)
                continue
            if created is None:  # switched to another model meanwhile: embed again
                session.expire(gallery)
                gallery = get_gallery(session, gallery_id)
                continue
            revision, images, rows = created
            committed = {d.file_name for d in pending}
            for item, image in zip(pending, images, strict=True):
                results[item.position].image = image
            runtime.indexes.apply(gallery_id, model.id, revision, added=rows)
            pending = []
        if pending:
            raise Conflict(f"gallery {gallery_id} keeps switching models; retry the upload")
    finally:
        for path in written:  # files of rows that were not committed: leave nothing behind
            if path.relative_to(settings.uploads_dir).as_posix() not in committed:
                path.unlink(missing_ok=True)
    _fill_request_duplicates(decoded, results)
    return results


# Longest label or external id (the columns' width; docs/service.md).
MAX_TEXT = 200


def _text_problem(upload: Upload) -> str | None:
    """Why the upload's label or external id cannot be stored (imports take labels from
    folder names, which the API's input rules never saw), or None."""
    for value, name in ((upload.label, "label"), (upload.external_id, "external_id")):
        if value is not None and len(value) > MAX_TEXT:
            return f"{name} is longer than {MAX_TEXT} characters"
        if value is not None and "\x00" in value:
            return f"{name} contains a NUL character"
    return None


def decode_for_embedding(
    runtime: Runtime, embedder: BatchingEmbedder, data: bytes
) -> PILImage.Image:
    """An uploaded file (an upload or a query) decoded at the size `embedder`'s
    preprocessing needs, within the decode budget (`open_upload`; raises ImageRejected)."""
    return open_upload(
        data,
        max_pixels=runtime.settings.max_image_pixels,
        max_bytes=runtime.settings.max_upload_bytes,
        min_side=embedder.decode_side,
        budget=runtime.decode_budget,
    )


def _resolve_duplicates(
    session: Session, gallery_id: int, items: list[_Decoded], results: list[UploadResult]
) -> list[_Decoded]:
    """Mark items whose content is already stored (or repeated earlier in the request) as
    duplicates; returns the items still to add."""
    digests = list({d.digest for d in items})
    existing = {
        image.content_hash: image
        for image in session.scalars(
            select(Image).where(Image.gallery_id == gallery_id, Image.content_hash.in_(digests))
        )
    }
    pending: list[_Decoded] = []
    seen: set[str] = set()
    for item in items:
        result = results[item.position]
        if item.digest in existing:
            result.image, result.duplicate, result.status_code = existing[item.digest], True, 200
        elif item.digest in seen:
            result.duplicate, result.status_code = True, 200  # filled once the first commits
        else:
            seen.add(item.digest)
            pending.append(item)
    return pending


def _fill_request_duplicates(decoded: list[_Decoded], results: list[UploadResult]) -> None:
    by_digest = {d.digest: results[d.position].image for d in decoded if results[d.position].image}
    for item in decoded:
        result = results[item.position]
        if result.duplicate and result.image is None:
            result.image = by_digest.get(item.digest)


def _write_files(settings: Settings, gallery_id: int, items: list[_Decoded]) -> list[Path]:
    """Write each file under a fresh server-generated name and flush it to disk."""
    folder = settings.uploads_dir / str(gallery_id)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in items:
        item.file_name = f"{gallery_id}/{uuid.uuid4().hex}.{item.extension}"
        path = settings.uploads_dir / item.file_name
        with open(path, "xb") as out:
            out.write(item.upload.data)
            out.flush()
            os.fsync(out.fileno())
        paths.append(path)
    if paths:
        fsync_dir(folder)
    return paths


def _commit(
    runtime: Runtime,
    session: Session,
    gallery: Gallery,
    model: Model,
    items: list[_Decoded],
    vectors: np.ndarray,
) -> tuple[int, list[Image], IndexRows] | None:
    """One transaction: bump the gallery's revision if it still uses `model` (the first write
    locks the gallery row, so a concurrent switch waits), insert images and embeddings, hand
    the rows to a shared index engine before the commit (`write_ahead`: if it fails, nothing is
    stored, so an acknowledged upload is always searchable)."""
    revision = session.scalar(
        update(Gallery)
        .where(Gallery.id == gallery.id, Gallery.model_id == model.id)
        .values(revision=Gallery.revision + 1)
        .returning(Gallery.revision)
    )
    if revision is None:
        session.rollback()
        get_gallery(session, gallery.id)  # NotFound if it was deleted
        return None
    images = []
    for item in items:
        image = Image(
            gallery_id=gallery.id,
            content_hash=item.digest,
            file_name=item.file_name,
            content_type=item.content_type,
            width=item.width,
            height=item.height,
            size_bytes=len(item.upload.data),
            label=item.upload.label,
            meta=item.upload.metadata,
            external_id=item.upload.external_id,
        )
        session.add(image)
        images.append(image)
    session.flush()
    session.add_all(
        ImageEmbedding(image_id=image.id, model_id=model.id, vector=vector.tobytes())
        for image, vector in zip(images, np.asarray(vectors, dtype=np.float32), strict=True)
    )
    rows = IndexRows(
        np.array([image.id for image in images], dtype=np.int64),
        np.asarray(vectors, dtype=np.float32),
        [image.label for image in images],
        [image.meta for image in images],
    )
    try:
        runtime.indexes.write_ahead(gallery.id, model.id, rows)
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return revision, images, rows


def delete_image(runtime: Runtime, session: Session, image_id: int) -> None:
    image = get_image(session, image_id)
    row = session.execute(
        update(Gallery)
        .where(Gallery.id == image.gallery_id)
        .values(revision=Gallery.revision + 1)
        .returning(Gallery.revision, Gallery.model_id)
    ).one()
    session.delete(image)
    session.commit()
    image_path(runtime.settings, image).unlink(missing_ok=True)
    thumbnail_path(runtime.settings, image).unlink(missing_ok=True)
    runtime.indexes.apply(
        image.gallery_id, row.model_id, row.revision, removed=np.array([image_id], dtype=np.int64)
    )


def embed_missing(
    runtime: Runtime,
    session: Session,
    gallery_id: int,
    model_id: int,
    *,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Store embeddings by `model_id` for the gallery's images that lack one (the index job,
    before `galleries.switch_index`); returns how many were added. `progress(done, total)`."""
    model = get_model(session, model_id)
    embedder = embedder_for(runtime, model)
    todo = missing_embeddings(session, gallery_id, model_id)
    files: dict[int, str] = {
        image_id: file_name
        for image_id, file_name in session.execute(
            select(Image.id, Image.file_name).where(Image.gallery_id == gallery_id)
        )
    }
    settings = runtime.settings

    def prepared_batches() -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Read, decode and preprocess the next batch (in `prefetch`'s thread). An image
        deleted meanwhile (its file gone) is skipped."""
        for start in range(0, len(todo), batch_size):
            ids, pictures = [], []
            for image_id in todo[start : start + batch_size]:
                try:
                    data = (settings.uploads_dir / files[image_id]).read_bytes()
                except (KeyError, FileNotFoundError):
                    continue
                ids.append(image_id)
                pictures.append(
                    open_upload(
                        data, max_pixels=settings.max_image_pixels, min_side=embedder.decode_side
                    )
                )
            yield ids, embedder.prepare(pictures)

    done = 0
    for ids, tensors in prefetch(prepared_batches(), name=f"index-{gallery_id}-decode"):
        vectors = embedder.embed(tensors)
        # Images deleted while this batch was embedded: their rows would fail the whole batch.
        alive = set(session.scalars(select(Image.id).where(Image.id.in_(ids))))
        session.add_all(
            ImageEmbedding(image_id=image_id, model_id=model_id, vector=vector.tobytes())
            for image_id, vector in zip(ids, vectors, strict=True)
            if image_id in alive
        )
        try:
            session.commit()
        except IntegrityError:  # deleted or embedded concurrently: the next pass sees it
            session.rollback()
            continue
        done += len(alive)
        if progress is not None:
            progress(done, len(todo))
    return done
