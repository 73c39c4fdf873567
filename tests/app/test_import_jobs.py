"""Import jobs as an attacker or a careless client would feed them (issue 17, items 4-5): one
bad member is skipped with its reason, never the whole job; every decompressed byte counts
toward the budget; the uploaded archive is deleted whatever the outcome; errors that readers
see hold neither SQL nor the server's paths."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import DataError

from app.core.config import Settings
from app.db.models import Image, Job
from app.services.galleries import create_gallery
from app.services.jobs.base import ARCHIVE_FILE, job_dir
from app.services.jobs.imports import body as import_body
from app.services.jobs.lifecycle import execute, without_server_paths
from app.services.models import register_path
from app.services.runtime import Runtime
from tests.app.conftest import migrated_runtime, png, worker_settings


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    settings = worker_settings(tmp_path, database_url=database_url)
    with migrated_runtime(settings) as started:
        yield started


@pytest.fixture
def gallery(runtime: Runtime) -> int:
    with runtime.session_factory() as session:
        model = register_path(session, runtime.settings, "tiny", "tiny")
        return create_gallery(session, "g", model.id).id


def run_import(runtime: Runtime, gallery: int, archive: bytes) -> Job:
    with runtime.session_factory() as session:
        job = Job(type="import", queue="cpu", params={"gallery_id": gallery, "archive": True})
        session.add(job)
        session.commit()
        job_id = job.id
    folder = job_dir(runtime.settings, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARCHIVE_FILE).write_bytes(archive)
    execute(runtime, job_id, "w@host", import_body)
    assert not (folder / ARCHIVE_FILE).exists()  # deleted whatever the outcome
    with runtime.session_factory() as session:
        return session.get(Job, job_id)


def tar_gz(members: dict[bytes | str, bytes], *, raw_names: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members.items():
            text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name
            info = tarfile.TarInfo(text)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def stored_labels(runtime: Runtime, gallery: int) -> list[str | None]:
    with runtime.session_factory() as session:
        return sorted(
            (i.label or "") for i in session.query(Image).filter(Image.gallery_id == gallery)
        )


def test_a_member_with_a_name_that_is_not_utf8_is_imported_under_a_readable_name(
    runtime: Runtime, gallery: int
):
    archive = tar_gz({b"caf\xe9/a.png": png(0, 0), "dogs/b.png": png(1, 0)})
    job = run_import(runtime, gallery, archive)
    assert job.state == "succeeded", job.error
    names = {entry["name"]: entry for entry in job.result["files"]}
    assert names["caf\ufffd/a.png"]["status"] == "added"
    assert names["dogs/b.png"]["status"] == "added"
    assert stored_labels(runtime, gallery) == ["caf\ufffd", "dogs"]


def test_a_label_over_200_characters_skips_that_member_with_its_reason(
    runtime: Runtime, gallery: int
):
    """Folder names become labels: one too long for the column is that member's error, on
    SQLite (which would store it) and on PostgreSQL (which refused it and failed the job)."""
    long_folder = "x" * 300
    members = {f"{long_folder}/a.png": png(0, 0), "ok/b.png": png(1, 0)}
    for kind in ("tar", "zip"):
        if kind == "zip":
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as bundle:
                for name, data in members.items():
                    bundle.writestr(name, data)
            archive = out.getvalue()
        else:
            archive = tar_gz(members)
        job = run_import(runtime, gallery, archive)
        assert job.state == "succeeded", job.error
        entries = {entry["name"]: entry for entry in job.result["files"]}
        assert entries[f"{long_folder}/a.png"]["status"] == "rejected"
        assert "longer than 200" in entries[f"{long_folder}/a.png"]["error"]
    assert stored_labels(runtime, gallery) == ["ok"]


def test_every_decompressed_byte_counts_toward_the_import_budget(tmp_path: Path, database_url):
    """A tar.gz of a few kilobytes holding a 256 MiB member that is not an image: skipping it
    still decompresses it, so it counts, and the job stops at the budget with the reason."""
    settings = worker_settings(tmp_path, database_url=database_url, import_max_bytes=8 * 1024**2)
    with migrated_runtime(settings) as runtime:
        with runtime.session_factory() as session:
            model = register_path(session, settings, "tiny", "tiny")
            gallery = create_gallery(session, "g", model.id).id
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, data in (("first/a.png", png(0, 0)), ("after/b.png", png(1, 0))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                if name.startswith("first"):
                    filler = tarfile.TarInfo("filler.bin")
                    filler.size = 256 * 1024**2
                    tar.addfile(filler, _Zeros(filler.size))
        archive = out.getvalue()
        assert len(archive) < 2 * 1024**2
        started = time.monotonic()
        job = run_import(runtime, gallery, archive)
        assert time.monotonic() - started < 30
        assert job.state == "succeeded", job.error
        assert "import_max_bytes" in job.result["stopped"]
        assert [entry["name"] for entry in job.result["files"]] == ["first/a.png"]
        assert job.result["added"] == 1


class _Zeros(io.RawIOBase):
    """`size` zero bytes, produced as read (never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def test_a_failed_import_deletes_its_archive_and_shows_no_sql_or_server_paths(
    runtime: Runtime, gallery: int, monkeypatch: pytest.MonkeyPatch
):
    """An unexpected error (here a driver error quoting its SQL and a server path) fails the
    job with its type only; the details stay in the worker's log."""
    unreadable = run_import(runtime, gallery, gzip.compress(b"not a tar at all" * 100))
    assert unreadable.state == "succeeded"
    assert "cannot be read" in unreadable.result["stopped"]

    secret = f"INSERT INTO images (label) VALUES ('{runtime.settings.data_dir.resolve()}/x')"

    def broken(*_args, **_kwargs):
        raise DataError(secret, {}, Exception("value too long for type character varying(200)"))

    monkeypatch.setattr("app.services.images.add_images", broken)
    failed = run_import(runtime, gallery, tar_gz({"a/x.png": png(0, 0)}))
    assert failed.state == "failed"
    assert failed.error.startswith("internal error (DataError)")
    assert "INSERT" not in failed.error and str(runtime.settings.data_dir) not in failed.error


def test_server_paths_are_replaced_by_their_setting_names(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", dataset_root=tmp_path / "datasets")
    message = f"no images in {(tmp_path / 'datasets').resolve()}/cats under {settings.data_dir}"
    shown = without_server_paths(message, settings)
    assert shown == "no images in <DATASET_ROOT>/cats under <DATA_DIR>"
