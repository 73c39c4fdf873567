"""`TrainConfig`: every knob of a training run in one validated place.

Defaults are the published DiVA/Margin values (DiVA's parameters.py) unless noted; presets in
`training/presets/*.json` adapt them to a dataset and a budget. Precedence: defaults < preset
< config file < command-line options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What to train on, how, and where to write it.
    data: str
    method: str = "margin"
    method_params: dict[str, Any] = Field(default_factory=dict)
    out: Path | None = None
    preset: str | None = None

    # Network.
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    pooling: Literal["avg", "avgmax"] = "avg"
    embedding_dim: int = Field(128, ge=1)  # Wu et al. 2017, Sec. 5; DiVA per-head size
    frozen_bn: bool = False  # DiVA R50 runs use frozen BN (arch resnet50_frozen_normalize)

    # Data and augmentation.
    image_size: int = Field(224, ge=32)  # the papers' crop (DiVA, MLRC); 112-160 on CPU
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision default, as DiVA's code
    hflip: float = Field(0.5, ge=0, le=1)
    test_crop_pct: float = Field(0.875, gt=0, le=1)  # Resize(256) + CenterCrop(224)
    interpolation: Literal["bilinear", "bicubic"] | None = None  # None: the backbone's own
    batch_size: int = Field(112, ge=2)  # DiVA parameters.py
    samples_per_class: int = Field(2, ge=2)  # DiVA: 56 classes x 2 images
    val_fraction: float = Field(0.25, ge=0, lt=1)  # one of MLRC's 4 class-disjoint folds
    val_group_separator: str | None = None  # keep classes sharing a name prefix on one side
    label_noise: float = Field(0.0, ge=0, le=1)  # Zhang et al. 2017 memorisation check
    max_classes: int | None = Field(None, ge=2)  # first N classes (sorted) of each split
    num_workers: int = Field(2, ge=0)

    # Budget and optimisation.
    epochs: int | None = Field(None, ge=1)
    iterations: int | None = Field(None, ge=1)
    time_budget_min: float | None = Field(None, gt=0)
    iterations_per_epoch: int | None = Field(None, ge=1)  # default: N_train // batch (DiVA)
    optimizer: Literal["adam", "adamw"] = "adam"  # DiVA uses Adam (diva_main.py)
    lr: float = Field(1e-5, gt=0)  # DiVA backbone + heads (parameters.py)
    head_lr: float | None = Field(None, gt=0)  # None: same as lr
    weight_decay: float = Field(4e-4, ge=0)  # DiVA (parameters.py)
    schedule: Literal["step", "cosine", "none"] = "step"
    milestones: list[int] = Field(default_factory=list)  # epochs; DiVA "tau" (parameters.py)
    gamma: float = Field(0.3, gt=0, le=1)  # DiVA SOP/BN-Inception sample runs
    warmup_iterations: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    # Evaluation and checkpoints.
    eval_every: int = Field(1, ge=0)  # epochs between validation passes (0: only at the end)
    eval_test_every: int = Field(0, ge=0)  # epochs between test passes (0: best and last only)
    eval_train: bool = False  # also report train-split metrics (memorisation check)
    eval_batch_size: int = Field(128, ge=1)
    select_metric: str = "recall@1"
    # A model artifact measured on the same test split at the end (e.g. the untrained backbone
    # from `lookalike pretrained`), so results.json says whether training helped.
    baseline: Path | None = None
    checkpoint_every: int = Field(100, ge=1)  # iterations between resumable snapshots

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of "
                f"samples_per_class {self.samples_per_class}"
            )
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self

    @property
    def classes_per_batch(self) -> int:
        return self.batch_size // self.samples_per_class


# The best method of docs/results.md's comparison table on each offline benchmark: DVML+margin
# with the backbone features detached, its presets chosen on each benchmark's validation split.
# Any other data gets the same method on the papers' recipe (the `dvml` preset).
RECOMMENDED_PRESETS = {"IconThemes": "dvml-icons", "CJK-Fonts": "dvml-cjk"}
GENERAL_PRESET = "dvml"


def recommended_preset(data: str) -> str:
    """The preset to train `data` (a `--data` spec) with when neither method nor preset is
    chosen: the benchmark's own when `data` is a benchmark build, else `GENERAL_PRESET`."""
    from training.data.benchmarks.common import read_manifest

    scheme, _, path = data.rpartition(":")  # "imagefolder:PATH" or a bare ImageFolder root
    manifest = read_manifest(Path(path)) if scheme in ("", "imagefolder") else None
    benchmark = str((manifest or {}).get("benchmark"))
    return RECOMMENDED_PRESETS.get(benchmark, GENERAL_PRESET)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_summary(name: str) -> dict[str, str]:
    """A preset's method and the description its file gives (`_comment`), for listings."""
    path = PRESET_DIR / f"{name}.json"
    comment = json.loads(path.read_text()).get("_comment", "") if path.is_file() else ""
    method = read_preset(name).get("method") or TrainConfig.model_fields["method"].default
    return {"method": str(method), "description": comment}


def read_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    preset = json.loads(path.read_text())
    preset.pop("_comment", None)
    base = preset.pop("extends", None)  # a variant of another preset: only what differs
    if not base:
        return preset
    resolved = read_preset(base)
    method_params = {**resolved.get("method_params", {}), **preset.pop("method_params", {})}
    resolved.update(preset)
    if method_params:
        resolved["method_params"] = method_params
    return resolved


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON or TOML file with TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from error


def resolve_config(
    overrides: dict[str, Any], config_file: Path | None = None, preset: str | None = None
) -> TrainConfig:
    """Merge preset, file and explicit overrides (None values mean "not given")."""
    values: dict[str, Any] = {}
    file_values = read_config_file(config_file) if config_file else {}
    preset = preset or overrides.get("preset") or file_values.get("preset")
    if preset:
        values.update(read_preset(preset))
        values["preset"] = preset
    values.update(file_values)
    given = {k: v for k, v in overrides.items() if v is not None}
    method_params = {**values.get("method_params", {}), **given.pop("method_params", {})}
    values.update(given)
    values["method_params"] = method_params
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid training configuration: {problems}") from error
