"""The service's one configuration object: every setting comes from here (environment variables
prefixed `LOOKALIKE_`, or a `.env` file), nothing is hard-coded elsewhere."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.threads import ThreadPolicy


class Settings(BaseSettings):
    # env_ignore_empty: `LOOKALIKE_X=` (an empty value, as compose's `${X:-}` gives) means
    # the default, not an empty string or path.
    model_config = SettingsConfigDict(
        env_prefix="LOOKALIKE_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

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
    open_metrics: bool | None = Field(
        None,
        description="/metrics (gallery ids, index sizes) answers without an API key; "
        "empty: the same as OPEN_READS.",
    )
    auto_api_key: bool = Field(
        True,
        description="With no API_KEYS configured, generate one at first start "
        "(DATA_DIR/api_key, printed once) and require it; false leaves every route open.",
    )

    # Upload hardening (docs/service.md, "Upload hardening").
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="Per-file upload limit (413).")
    max_request_bytes: int = Field(200 * 1024 * 1024, description="Whole-request limit (413).")
    max_image_pixels: int = Field(
        40_000_000, description="Decompression-bomb cap, below Pillow's default of 89.5 M pixels."
    )
    max_request_pixels: int = Field(
        400_000_000,
        ge=1,
        description="Most pixels the images of one request may declare in total (413): ten "
        "images at the largest accepted size.",
    )
    decode_budget_pixels: int = Field(
        40_000_000,
        description="Most pixels the process decodes at once, summed over concurrent requests "
        "(about 6 bytes of memory each at worst); a decode that waits 30 s for room gets 503.",
        ge=1,
    )
    max_files_per_request: int = Field(100, description="Most files one upload request may carry.")
    max_model_bytes: int = Field(
        2 * 1024**3, description="Per-file and per-request limit for model uploads (413)."
    )

    # Catalog and search.
    seed_builtin_model: bool = Field(
        True,
        description="Build and register the pretrained EfficientNet-Lite0 model at start-up.",
    )
    extra_builtin_models: list[str] = Field(
        default_factory=list,
        description="More built-in backbones registered with it (efficientnet_lite1, "
        "efficientnet_lite2; resnet18/50 need torch's cache), e.g. "
        '["efficientnet_lite2"]; docs/models.md compares them.',
    )
    max_k: int = Field(1000, description="Largest k + offset a search may ask for.")
    orphan_grace_s: float = Field(
        3600.0,
        ge=0,
        description="Upload files without a database row (an upload killed before its commit) "
        "are deleted at start once older than this.",
    )
    thumbnail_size: int = Field(256, description="Longer side of thumbnails, in pixels.")
    snapshot_every: int = Field(
        1000, description="Index changes after which a gallery's FAISS snapshot is rewritten."
    )

    # Index backend (docs/service.md, "Index backends").
    index_backend: Literal["faiss", "milvus"] = Field(
        "faiss",
        description="Where gallery vectors are indexed: faiss = in each API process's memory, "
        "replayed from the database; milvus = a Milvus engine every replica shares (needs the "
        "`milvus` extra).",
    )
    milvus_uri: str = Field(
        "",
        description="Milvus to use: a Milvus Lite data path such as ./var/milvus.db (one "
        "process only), or http://host:19530 for a Milvus server; empty = DATA_DIR/milvus.db.",
    )
    milvus_token: str = Field(
        "", description="Milvus credentials (user:password, or an API key); empty = none."
    )
    milvus_db_name: str = Field("", description="Milvus database; empty = the server's default.")
    milvus_collection_prefix: str = Field(
        "lookalike",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,100}$",
        description="Prefix of this deployment's Milvus collections and aliases (several "
        "deployments on one engine).",
    )
    milvus_timeout_s: float = Field(
        10.0, gt=0, description="Each Milvus call gives up after this long (then 503)."
    )
    reconcile_interval_s: float = Field(
        60.0,
        ge=0,
        description="How often the API reconciles galleries whose engine writes failed (the "
        "engine was down) with the database; 0 = only at start and on demand.",
    )

    # Compute.
    threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of each compute pool (torch, ONNX Runtime, OpenMP, BLAS) "
        "in each process; 0 = the CPUs the process may use divided by CPU_SHARERS "
        "(docs/service.md, Threads).",
    )
    cpu_sharers: int = Field(
        0,
        ge=0,
        description="Processes sharing this process's CPUs; 0 = 1, or the API plus its local "
        "workers under `lookalike serve`. Under compose each container has its own CPUs.",
    )
    embed_backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="Runtime of the embedding forward pass: auto = ONNX Runtime on a CPU when "
        "the model's ONNX export matches torch, else torch.",
    )
    device: str = Field("cpu", description="Device the API embeds on (cpu or cuda).")
    request_threads: int = Field(
        16,
        ge=1,
        description="Threads that run the API's blocking routes: the requests served at once "
        "(more wait their turn); the database pool holds one connection for each.",
    )
    db_pool_timeout_s: float = Field(
        30.0, gt=0, description="Wait for a database connection before answering 503."
    )
    embed_batch_size: int = Field(32, description="Largest micro-batch the embedder forms.")
    embed_max_wait_ms: float = Field(
        0.0,
        description="How long the embedder waits for more requests after the first; 0 still "
        "batches under load (requests queue while a batch runs) and adds no latency when idle.",
    )
    exact_search_budget_ms: float = Field(
        10.0,
        gt=0,
        description="An approximate (HNSW) index is suggested for a flat gallery whose exact "
        "search costs more than this per query: size x dimension, measured on the gallery's "
        "own searches (1280-d: about 13k images; 128-d: about 130k).",
    )
    faiss_search_threads: int = Field(
        1,
        description="OpenMP threads per FAISS search; 1 suits concurrent single queries (more "
        "threads made one query 30x slower on a busy 2-core host); 0 = all cores.",
    )

    # Jobs (Celery). Empty broker URL means the embedded SQLAlchemy transport over DATA_DIR.
    broker_url: str = Field("", description="Celery broker; empty = SQLite file in DATA_DIR.")
    result_backend: str = Field("", description="Celery result backend; empty = none needed.")
    visibility_timeout_s: int = Field(
        48 * 3600, description="Redis visibility timeout: longer than the longest job."
    )
    broker_key_prefix: str = Field(
        "", description="Prefix of every Redis key the broker writes (several apps on one Redis)."
    )
    broker_connect_timeout_s: float = Field(
        2.0, description="Job submission gives up (503) after this long without a broker."
    )
    job_heartbeat_s: float = Field(
        5.0, description="How often a running job writes its heartbeat and progress."
    )
    job_heartbeat_timeout_s: float = Field(
        120.0,
        description="A running job whose heartbeat is older than this has lost its worker and is "
        "marked failed.",
    )
    worker_device: str = Field(
        "auto", description="Device for train/evaluate/index jobs (auto, cpu or cuda)."
    )
    worker_num_workers: int = Field(
        2, description="Data-loader processes in train/evaluate jobs (0 with a prefork pool)."
    )
    import_max_files: int = Field(100_000, description="Most files one import job adds.")
    import_max_bytes: int = Field(
        20 * 1024**3, description="Most uncompressed bytes one import job reads (archive bombs)."
    )
    max_archive_bytes: int = Field(
        2 * 1024**3, description="Largest archive accepted by an import job upload (413)."
    )

    @field_validator("extra_builtin_models")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        from training.models.backbones import is_builtin

        unknown = [name for name in names if not is_builtin(name)]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a built-in backbone (docs/models.md)")
        return names

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'lookalike.db').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"
        return self

    @property
    def milvus_location(self) -> str:
        """MILVUS_URI, or a Milvus Lite data path in the data directory."""
        return self.milvus_uri or str((self.data_dir / "milvus.db").resolve())

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

    def thread_policy(self) -> ThreadPolicy:
        """Threads per compute pool in this process (`training.threads`)."""
        return ThreadPolicy.resolve(threads=self.threads, sharers=self.cpu_sharers)

    @property
    def datasets_dir(self) -> Path:
        """Where dataset jobs build the icons/cjk benchmarks."""
        return self.data_dir / "datasets"


@lru_cache
def get_settings() -> Settings:
    return Settings()
