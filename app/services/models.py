"""Registering embedding models: an artifact (card.json + model.safetensors, see
`training.checkpoint`) is validated by loading it, copied under Settings.models_dir with a
server-generated name; its card and weights never change again (a model version is
immutable). Its ONNX export (`training.export`) is derived data: made at registration from the
weights and checked against them, so that the service embeds on ONNX Runtime from the first
search, and made again when missing or stale."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Gallery, Model
from app.embedder import BatchingEmbedder
from app.services.errors import Conflict, Invalid, NotFound
from app.services.runtime import Runtime
from training.checkpoint import CARD_FILE, WEIGHTS_FILE, CheckpointError, load_model
from training.evaluation.cluster_classifier import ClusterClassifier
from training.export import ExportError, export_onnx, remove_export

logger = logging.getLogger(__name__)

BUILTIN_MODEL = "pretrained-efficientnet-lite0"


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.id)))


def get_model(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFound(f"model {model_id} does not exist; GET /api/v1/models lists the models")
    return model


def artifact_dir(settings: Settings, model: Model) -> Path:
    return settings.models_dir / model.artifact


def register_artifact(
    session: Session, settings: Settings, source: Path, name: str, *, builtin: bool = False
) -> Model:
    """Validate the artifact directory `source`, copy it into the model store and register it
    under `name` (committed). Used by the API, the seed step and the training job."""
    _check_name_free(session, name)
    staging = settings.models_dir / f".staging-{uuid.uuid4().hex}"
    try:
        # copyfile, not copy2: the copies get this process's (owner-only) modes, not the
        # source's; copytree still copies each folder's mode, hence the chmod.
        shutil.copytree(source, staging, symlinks=False, copy_function=shutil.copyfile)
        for folder in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            folder.chmod(0o700)
        return _register_staged(session, settings, staging, name, builtin=builtin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def register_upload(
    session: Session, settings: Settings, name: str, card: bytes, weights: Iterable[bytes]
) -> Model:
    """Register an artifact sent as its two files (the card's JSON and the weights' chunks)."""
    _check_name_free(session, name)
    staging = settings.models_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        (staging / CARD_FILE).write_bytes(card)
        with open(staging / WEIGHTS_FILE, "wb") as out:
            for chunk in weights:
                out.write(chunk)
        return _register_staged(session, settings, staging, name, builtin=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def register_path(session: Session, settings: Settings, name: str, path: str) -> Model:
    """Register an artifact directory named by a path under Settings.model_root (relative to
    it, or absolute inside it); symlinks leading out of the root are refused."""
    if settings.model_root is None:
        raise Invalid(
            "registering a model by path is disabled: set LOOKALIKE_MODEL_ROOT on the server, "
            "or upload the artifact's card.json and model.safetensors"
        )
    root = settings.model_root.resolve()
    candidate = Path(path)
    outside = Invalid(f"{path!r} is not a model directory under the server's model root")
    try:
        directory = (root / candidate).resolve(strict=True)
        files = [(directory / f).resolve(strict=True) for f in (CARD_FILE, WEIGHTS_FILE)]
    except (OSError, RuntimeError, ValueError) as error:  # ValueError: a NUL in the path
        raise outside from error
    if not all(p.is_relative_to(root) for p in (directory, *files)) or not directory.is_dir():
        raise outside
    return register_artifact(session, settings, directory, name)


def register_pretrained(
    session: Session,
    settings: Settings,
    name: str,
    backbone: str,
    weights: tuple[str, Iterable[bytes]] | None = None,
    image_size: int | None = None,
) -> Model:
    """Build a pretrained backbone's features as a model (`lookalike pretrained` on the
    server) and register it. Without `weights` the backbone's own (built-ins: shipped with
    their packages; other timm models: the hub, so only on a server with internet); with them,
    an uploaded file as (file name, chunks). The card records the weights' source (the file's
    name) and SHA-256."""
    from training.checkpoint import export_pretrained
    from training.models.backbones import BackboneError

    _check_name_free(session, name)
    staging = settings.models_dir / f".staging-{uuid.uuid4().hex}"
    upload_dir = settings.models_dir / f".upload-{uuid.uuid4().hex}"
    try:
        source = "imagenet"
        if weights is not None:
            filename, chunks = weights
            upload_dir.mkdir(mode=0o700)
            upload = upload_dir / (Path(filename).name or "weights")
            with open(upload, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            source = str(upload)
        try:
            export_pretrained(staging, backbone, weights=source, image_size=image_size)
        except BackboneError as error:
            raise Invalid(str(error).replace(str(upload_dir), "the upload")) from error
        return _register_staged(session, settings, staging, name, builtin=False)
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _check_name_free(session: Session, name: str) -> None:
    if session.scalar(select(exists().where(Model.name == name))):
        raise Conflict(f"a model named {name!r} already exists; choose another name")


def _register_staged(
    session: Session, settings: Settings, staging: Path, name: str, *, builtin: bool
) -> Model:
    try:
        _, card, _ = load_model(staging)
    except CheckpointError as error:
        message = str(error).replace(str(staging), "the artifact")
        raise Invalid(f"not a valid model artifact: {message}") from error
    # An export that came with the artifact is dropped: the service trusts only its own.
    remove_export(staging)
    if settings.embed_backend != "torch" and settings.device == "cpu":
        try:  # now, so the first search does not wait for it
            export_onnx(staging)
        except ExportError as error:  # the embedder falls back to torch and logs why
            logger.warning("model %r has no ONNX export: %s", name, error)
    artifact = uuid.uuid4().hex
    model = Model(
        name=name,
        artifact=artifact,
        method=str(card.method.get("name", "unknown")),
        embedding_dim=card.embedding_dim,
        card=card.model_dump(mode="json"),
        builtin=builtin,
    )
    staging.rename(settings.models_dir / artifact)
    session.add(model)
    try:
        session.commit()
    except Exception:
        session.rollback()
        shutil.rmtree(settings.models_dir / artifact, ignore_errors=True)
        raise
    return model


def builtin_model(session: Session) -> Model | None:
    """The built-in pretrained model, if the server registered one (see `ensure_builtin`)."""
    return session.scalar(select(Model).where(Model.name == BUILTIN_MODEL))


def ensure_builtin(session: Session, settings: Settings) -> Model:
    """The pretrained EfficientNet-Lite0 features (training's `lookalike pretrained`), built
    and registered on first start so a fresh install can search at once, and the backbones of
    Settings.extra_builtin_models beside it (`pretrained-<backbone>`). Returns Lite0's."""
    from training.models.backbones import ALIASES

    default = _ensure_pretrained(session, settings, BUILTIN_MODEL, "efficientnet_lite0")
    for backbone in settings.extra_builtin_models:
        name = f"pretrained-{ALIASES.get(backbone, backbone).replace('_', '-')}"
        if name != BUILTIN_MODEL:
            _ensure_pretrained(session, settings, name, backbone)
    return default


def _ensure_pretrained(session: Session, settings: Settings, name: str, backbone: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is not None:
        return model
    from training.checkpoint import export_pretrained

    staging = settings.models_dir / f".staging-{uuid.uuid4().hex}"
    try:
        logger.info("building the built-in model %s", name)
        export_pretrained(staging, backbone)
        return _register_staged(session, settings, staging, name, builtin=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def delete_model(session: Session, settings: Settings, model_id: int) -> None:
    model = get_model(session, model_id)
    if model.builtin:
        raise Conflict("the built-in model cannot be deleted")
    users = session.scalar(select(func.count()).where(Gallery.model_id == model_id))
    if users:
        raise Conflict(
            f"model {model_id} is used by {users} galleries; delete them or switch them "
            "to another model first"
        )
    session.delete(model)
    session.commit()
    shutil.rmtree(artifact_dir(settings, model), ignore_errors=True)


def embedder_for(runtime: Runtime, model: Model) -> BatchingEmbedder:
    """The shared, batching embedder of a model (loaded on first use)."""
    return runtime.embedders.get(str(model.id), artifact_dir(runtime.settings, model))


def cluster_classifier(runtime: Runtime, model: Model) -> ClusterClassifier | None:
    """Magnet's kNN-on-clusters classifier from the artifact's extras (None for other models)."""
    if model.method != "magnet":
        return None
    if model.id not in runtime.cluster_classifiers:
        _, _, extras = load_model(artifact_dir(runtime.settings, model))
        try:
            classifier = ClusterClassifier.from_extras(extras)
        except ValueError:  # a Magnet artifact saved before its clusters were fitted
            classifier = None
        runtime.cluster_classifiers[model.id] = classifier
    return runtime.cluster_classifiers[model.id]
