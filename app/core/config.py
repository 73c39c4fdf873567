"""The service's one configuration object: every setting comes from here (environment variables
prefixed `LOOKALIKE_`, or a `.env` file), nothing is hard-coded elsewhere."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", env_file=".env", extra="ignore")

    # Storage. The embedded default keeps everything under one data directory.
    data_dir: Path = Field(Path("var"), description="Root of uploads, indexes and the SQLite file.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means SQLite at DATA_DIR/lookalike.db."
    )
    model_root: Path | None = Field(
        None, description="Checkpoints may be registered by path only under this folder."
    )
    dataset_root: Path | None = Field(
        None, description="Datasets and import folders may be referenced only under this folder."
    )

    # Access control. With no keys configured every route is open (local use only).
    api_keys: list[str] = Field(
        default_factory=list, description="Keys accepted in the X-API-Key header for writes."
    )
    open_reads: bool = Field(True, description="Read routes answer without an API key.")

    # Upload hardening (serving.md section 5).
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="Per-file upload limit (413).")
    max_request_bytes: int = Field(200 * 1024 * 1024, description="Whole-request limit (413).")
    max_image_pixels: int = Field(
        40_000_000, description="Decompression-bomb cap, below Pillow's default of 89.5 M pixels."
    )

    # Compute.
    torch_threads: int = Field(0, description="Intra-op threads for embedding; 0 = torch default.")
    device: str = Field("cpu", description="Device the API embeds on (cpu or cuda).")
    embed_batch_size: int = Field(32, description="Largest micro-batch the embedder forms.")
    embed_max_wait_ms: float = Field(
        5.0, description="How long the embedder waits to fill a micro-batch."
    )
    hnsw_suggest_threshold: int = Field(
        200_000, description="Gallery size above which an approximate index is suggested."
    )

    # Jobs (Celery). Empty broker URL means the embedded SQLAlchemy transport over DATA_DIR.
    broker_url: str = Field("", description="Celery broker; empty = SQLite file in DATA_DIR.")
    result_backend: str = Field("", description="Celery result backend; empty = none needed.")
    visibility_timeout_s: int = Field(
        48 * 3600, description="Redis visibility timeout: longer than the longest job."
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'lookalike.db').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"
        return self

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def indexes_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
