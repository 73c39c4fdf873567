"""The index job's embedding pass (`images.embed_missing`): decoding runs ahead of the forward
pass, and images deleted meanwhile are skipped instead of failing the job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.db.models import ImageEmbedding
from app.services import galleries, images, models
from app.services.images import Upload
from tests.app.conftest import migrated_runtime, png, worker_settings


def test_embed_missing_embeds_everything_and_skips_deleted_images(tmp_path: Path) -> None:
    settings = worker_settings(tmp_path)
    with migrated_runtime(settings) as runtime, runtime.session_factory() as session:
        first = models.register_path(session, runtime.settings, "first", "tiny")
        second = models.register_path(session, runtime.settings, "second", "tiny")
        gallery = galleries.create_gallery(session, "g", first.id)
        uploads = [Upload(data=png(i % 3, i), filename=f"{i}.png") for i in range(7)]
        added = [r.image for r in images.add_images(runtime, session, gallery.id, uploads)]
        gone = added[3]
        images.image_path(runtime.settings, gone).unlink()  # deleted while the job runs
        progress: list[tuple[int, int]] = []
        done = images.embed_missing(
            runtime,
            session,
            gallery.id,
            second.id,
            batch_size=2,
            progress=lambda d, t: progress.append((d, t)),
        )
        assert done == 6 and progress[-1] == (6, 7)
        stored = session.scalars(
            select(ImageEmbedding).where(ImageEmbedding.model_id == second.id)
        ).all()
        assert sorted(e.image_id for e in stored) == sorted(i.id for i in added if i is not gone)
        # The same vectors as the first model's (same weights), computed ahead of the forward.
        first_vectors = {
            e.image_id: np.frombuffer(e.vector, dtype=np.float32)
            for e in session.scalars(
                select(ImageEmbedding).where(ImageEmbedding.model_id == first.id)
            )
        }
        for embedding in stored:
            np.testing.assert_allclose(
                np.frombuffer(embedding.vector, dtype=np.float32),
                first_vectors[embedding.image_id],
                atol=1e-5,
            )
