"""Milvus collections of gallery vectors: naming, schema, index parameters and calls.

The Milvus counterpart of app/index_store.py: it knows Milvus (pymilvus `MilvusClient`), not the
database; app/services/milvus_indexes.py keeps it equal to the database.

Mapping (docs/service.md, "Index backends"):
- one collection per gallery and index version, `<prefix>_g<gallery>_v<version>_<stamp>`
  (`stamp`: creation time in ms, hex, so two builds of one version never collide), with
  `id` (INT64, the image id, primary key), `vector` (FLOAT_VECTOR, L2-normalised, inner-product
  metric = cosine), `label` (VARCHAR, nullable) and `meta` (JSON, nullable);
- an alias `<prefix>_g<gallery>` that points at the active collection; a switch builds the new
  collection first and moves the alias in one `alter_alias` (atomic in Milvus);
- index types: flat = FLAT, hnsw = HNSW (M, efConstruction; ef at search), ivfpq = IVF_PQ
  (nlist, m, nbits 8; nprobe at search), with the same defaults and the same small-gallery
  fallback to flat as the FAISS backend;
- consistency level Strong on every collection: a search sees every write acknowledged before
  it started (an upload is acknowledged only after its rows are in Milvus).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app.index_store import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_REFINE_FACTOR,
    HNSW_M,
    IVFPQ_MIN_TRAIN,
    IndexType,
    default_nprobe,
    ivfpq_shape,
    normalised,
)

log = logging.getLogger(__name__)

INSERT_BATCH = 1000  # rows per insert call (gRPC messages stay far below 64 MB at 1280-d)
IDS_BATCH = 10_000  # expected ids per query when listing a collection
MAX_TOPK = 16_384  # Milvus's limit on a search's limit + offset
MAX_QUERY_ROWS = 16_384  # and on the rows one query returns
_ID_SPACE_END = 2**62  # image ids are positive database keys, far below this
LABEL_MAX_LENGTH = 800  # bytes: 200 characters of up to 4 UTF-8 bytes (images.MAX_TEXT)
_NAME = re.compile(r"^(?P<prefix>.+)_g(?P<gallery>\d+)_v(?P<version>\d+)_(?P<stamp>[0-9a-f]+)$")

T = TypeVar("T")


def _import_pymilvus() -> Any:
    """pymilvus (the optional `milvus` extra), its loggers quietened: it logs every failed call
    at ERROR with a traceback (configured at its import), while failures reach the caller here
    as EngineUnavailable / EngineError and are logged once there."""
    import pymilvus

    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.decorators"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


class EngineUnavailable(RuntimeError):
    """Milvus could not be reached (down, restarting, network, timeout)."""


class EngineError(RuntimeError):
    """Milvus answered with an error (a refused setting, a missing collection)."""


@dataclass(frozen=True)
class CollectionName:
    gallery_id: int
    version: int
    stamp: int  # ms since the epoch when the build started

    def text(self, prefix: str) -> str:
        return f"{prefix}_g{self.gallery_id}_v{self.version}_{self.stamp:x}"


def parse_name(name: str, prefix: str) -> CollectionName | None:
    match = _NAME.match(name)
    if match is None or match["prefix"] != prefix:
        return None
    return CollectionName(int(match["gallery"]), int(match["version"]), int(match["stamp"], 16))


def resolved_index(
    index_type: IndexType, dimension: int, count: int, params: dict[str, Any]
) -> tuple[IndexType, dict[str, Any], str | None]:
    """The index type and full parameters a collection of `count` vectors gets, and a note when
    IVF-PQ falls back to flat (the FAISS backend's rule: too few vectors to train PQ)."""
    params = dict(params)
    if index_type is IndexType.ivfpq and count < IVFPQ_MIN_TRAIN:
        note = (
            f"IVF-PQ needs at least {IVFPQ_MIN_TRAIN:,} vectors to train its quantizers, got "
            f"{count:,}; built an exact flat index instead"
        )
        return IndexType.flat, {}, note
    if index_type is IndexType.hnsw:
        params.setdefault("m", HNSW_M)
        params.setdefault("ef_search", DEFAULT_EF_SEARCH)
        params.setdefault("ef_construction", DEFAULT_EF_CONSTRUCTION)
        integers: tuple[str, ...] = ("m", "ef_search", "ef_construction")
    elif index_type is IndexType.ivfpq:
        nlist, m = ivfpq_shape(dimension, count, params)
        params.update(nlist=nlist, m=m)
        params.setdefault("nprobe", default_nprobe(nlist))
        params.setdefault("refine_factor", DEFAULT_REFINE_FACTOR)
        integers = ("nlist", "m", "nprobe", "refine_factor")
    else:
        integers = ()
    for key in integers:  # settings stored by hand or by an older version: fail at build
        params[key] = int(params[key])
    return index_type, params, None


def _milvus_index(index_type: IndexType, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if index_type is IndexType.hnsw:
        return "HNSW", {"M": int(params["m"]), "efConstruction": int(params["ef_construction"])}
    if index_type is IndexType.ivfpq:
        return "IVF_PQ", {"nlist": int(params["nlist"]), "m": int(params["m"]), "nbits": 8}
    return "FLAT", {}


def search_params(index_type: IndexType, params: dict[str, Any], k: int) -> dict[str, Any]:
    if index_type is IndexType.hnsw:
        return {"metric_type": "IP", "params": {"ef": max(int(params["ef_search"]), k)}}
    if index_type is IndexType.ivfpq:
        return {"metric_type": "IP", "params": {"nprobe": int(params["nprobe"])}}
    return {"metric_type": "IP", "params": {}}


def literal(value: Any) -> str:
    """A Milvus filter literal: JSON strings (quotes and backslashes escaped), numbers, and
    true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def _unreachable(error: BaseException) -> bool:
    text = str(error).lower()
    if isinstance(error, ConnectionError | TimeoutError | OSError):
        return True
    if type(error).__name__ in {"_InactiveRpcError", "RpcError", "MilvusUnavailableException"}:
        return True
    return any(
        word in text
        for word in ("connect", "unavailable", "deadline", "timeout", "timed out", "closed")
    )


class MilvusStore:
    """Calls on one Milvus deployment through a lazily (re)connected `MilvusClient`."""

    def __init__(
        self, uri: str, *, token: str = "", db_name: str = "", prefix: str, timeout_s: float
    ) -> None:
        self.uri = uri
        self.token = token
        self.db_name = db_name
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._client_lock = threading.Lock()
        self._client_obj: Any = None

    # Connection and errors.

    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                pymilvus = _import_pymilvus()
                if self.uri.endswith(".db"):
                    # Milvus Lite's server runs in this process and its gRPC servicer logs the
                    # calls it does not implement (AllocTimestamp) at ERROR; pymilvus copes.
                    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
                try:
                    self._client_obj = pymilvus.MilvusClient(
                        uri=self.uri,
                        token=self.token,
                        db_name=self.db_name,
                        timeout=self.timeout_s,
                    )
                except Exception as error:
                    raise self._translate(error, "connect") from error
            return self._client_obj

    def _translate(self, error: BaseException, what: str) -> RuntimeError:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        if "locked" in reason.lower() and self.uri.endswith(".db"):
            return EngineUnavailable(
                f"the Milvus Lite data at {self.uri} is open in another process; run one Milvus "
                "server for every process (`milvus-lite server --data-dir PATH --port 19530`, "
                "LOOKALIKE_MILVUS_URI=http://127.0.0.1:19530)"
            )
        if _unreachable(error):
            return EngineUnavailable(
                f"Milvus at {self.describe()} did not answer ({what}): {reason}"
            )
        return EngineError(f"Milvus refused {what}: {reason}")

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except (EngineUnavailable, EngineError):
            raise
        except Exception as error:
            raise self._translate(error, what) from error

    def _call(self, what: str, call: Callable[[Any], T], collection: str | None = None) -> T:
        """Run `call(client)`; a collection the engine released (after its restart) is loaded
        again and the call retried once."""
        with self._calling(what):
            client = self._client()
            try:
                return call(client)
            except Exception as error:
                text = str(error).lower()
                if collection is None or not ("released" in text or "not loaded" in text):
                    raise
                client.load_collection(collection, timeout=self.timeout_s)
                return call(client)

    def describe(self) -> str:
        """The URI without credentials."""
        return re.sub(r"//[^@/]*@", "//", self.uri)

    def ping(self) -> None:
        self._call("a health check", lambda c: c.list_collections(timeout=self.timeout_s))

    def close(self) -> None:
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a dead connection
                log.debug("closing the Milvus client failed", exc_info=True)
        if self.uri.endswith(".db"):  # the in-process Milvus Lite server pymilvus started
            try:
                from milvus_lite.server_manager import server_manager_instance
            except ImportError:
                return
            server_manager_instance.release_server(self.uri)

    # Names.

    def alias(self, gallery_id: int) -> str:
        return f"{self.prefix}_g{gallery_id}"

    def collections(self) -> dict[str, CollectionName]:
        """This deployment's gallery collections, by name."""
        names = self._call("listing collections", lambda c: c.list_collections())
        parsed = {name: parse_name(name, self.prefix) for name in names}
        return {name: info for name, info in parsed.items() if info is not None}

    def alias_target(self, gallery_id: int) -> str | None:
        alias = self.alias(gallery_id)
        try:
            described = self._call("describing an alias", lambda c: c.describe_alias(alias))
        except EngineError:  # no such alias
            return None
        return described.get("collection_name") or None

    def point_alias(self, gallery_id: int, collection: str) -> None:
        """Make the gallery's alias point at `collection` (created the first time)."""
        alias = self.alias(gallery_id)
        if self.alias_target(gallery_id) is None:
            self._call("creating an alias", lambda c: c.create_alias(collection, alias))
        else:
            self._call("moving an alias", lambda c: c.alter_alias(collection, alias))

    def drop_alias(self, gallery_id: int) -> None:
        if self.alias_target(gallery_id) is not None:
            self._call("dropping an alias", lambda c: c.drop_alias(self.alias(gallery_id)))

    # Collections.

    def create(
        self, name: str, dimension: int, index_type: IndexType, params: dict[str, Any]
    ) -> None:
        pymilvus = _import_pymilvus()
        DataType = pymilvus.DataType
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("label", DataType.VARCHAR, max_length=LABEL_MAX_LENGTH, nullable=True)
        schema.add_field("meta", DataType.JSON, nullable=True)
        kind, build = _milvus_index(index_type, params)

        def create(client: Any) -> None:
            index_params = client.prepare_index_params()
            index_params.add_index(
                field_name="vector", index_type=kind, metric_type="IP", params=build
            )
            client.create_collection(
                name, schema=schema, index_params=index_params, consistency_level="Strong"
            )

        self._call(f"creating collection {name}", create)

    def drop(self, name: str) -> None:
        self._call(f"dropping collection {name}", lambda c: c.drop_collection(name))

    def insert(
        self,
        name: str,
        ids: np.ndarray,
        vectors: np.ndarray,
        labels: list[str | None],
        metadata: list[dict[str, Any] | None],
    ) -> None:
        """Insert (or replace: upsert by id) rows; vectors are L2-normalised here."""
        if not len(ids):
            return
        unit = normalised(vectors, vectors.shape[1], "vectors")
        for start in range(0, len(ids), INSERT_BATCH):
            stop = start + INSERT_BATCH
            rows = [
                {"id": int(i), "vector": v.tolist(), "label": label, "meta": meta}
                for i, v, label, meta in zip(
                    ids[start:stop],
                    unit[start:stop],
                    labels[start:stop],
                    metadata[start:stop],
                    strict=True,
                )
            ]
            self._call(f"writing to {name}", partial(_upsert, name=name, rows=rows), name)

    def flush(self, name: str) -> None:
        """Seal what was written so it gets indexed: after a bulk load, searches of growing
        segments are brute force (Milvus Lite 3.2 at 100k x 128: 1.6 s a query before, 90 ms
        after)."""
        self._call(f"flushing {name}", lambda c: c.flush(name), name)

    def delete(self, name: str, ids: np.ndarray) -> None:
        if len(ids):
            listed = [int(i) for i in ids]
            self._call(f"deleting from {name}", lambda c: c.delete(name, ids=listed), name)

    def ids(self, name: str, expected: np.ndarray) -> np.ndarray:
        """Every id in the collection, sorted. Read in windows of the id space of about
        `IDS_BATCH` `expected` ids each (the database's ids); a window that fills a whole
        query result (extra ids the database lacks) is halved and read again."""
        edges = [int(i) for i in np.sort(expected)[IDS_BATCH::IDS_BATCH]]
        windows = list(zip([0, *edges], [*edges, _ID_SPACE_END], strict=True))
        found: list[np.ndarray] = []
        while windows:
            low, high = windows.pop()
            expr = f"id >= {low} and id < {high}"
            rows = self._call(f"listing {name}", partial(_ids_where, name=name, expr=expr), name)
            if len(rows) >= MAX_QUERY_ROWS and high - low > 1:
                middle = low + (high - low) // 2
                windows += [(low, middle), (middle, high)]
                continue
            found.append(np.asarray([int(row["id"]) for row in rows], dtype=np.int64))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def count(self, name: str) -> int:
        rows = self._call(
            f"counting {name}",
            lambda c: c.query(name, filter="", output_fields=["count(*)"]),
            name,
        )
        return int(rows[0]["count(*)"])

    def search(
        self,
        name: str,
        queries: np.ndarray,
        limit: int,
        *,
        expr: str,
        params: dict[str, Any],
        with_meta: bool,
    ) -> list[list[tuple[int, float, dict[str, Any] | None]]]:
        """Per query: (id, inner product, metadata when asked), best first."""
        fields = ["meta"] if with_meta else ["id"]
        unit = normalised(queries, queries.shape[1], "query vectors")
        found = self._call(
            f"searching {name}",
            lambda c: c.search(
                name,
                data=[q.tolist() for q in unit],
                limit=limit,
                filter=expr,
                output_fields=fields,
                search_params=params,
            ),
            name,
        )
        return [
            [
                (int(hit["id"]), float(hit["distance"]), (hit.get("entity") or {}).get("meta"))
                for hit in row
            ]
            for row in found
        ]


def new_collection_name(prefix: str, gallery_id: int, version: int) -> str:
    return CollectionName(gallery_id, version, int(time.time() * 1000)).text(prefix)


# Calls made in loops, as functions: a lambda would capture the loop variable late.
def _upsert(client: Any, *, name: str, rows: list[dict[str, Any]]) -> Any:
    return client.upsert(name, rows)


def _ids_where(client: Any, *, name: str, expr: str) -> list[dict[str, Any]]:
    return client.query(name, filter=expr, output_fields=["id"], limit=MAX_QUERY_ROWS)
