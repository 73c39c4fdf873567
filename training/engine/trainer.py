"""A small, complete training loop shared by every method.

What it does beyond the textbook loop, and why:
- Augmentation randomness is a function of (seed, epoch, batch, position), not of worker
  scheduling, so a run killed mid-epoch and resumed from its snapshot sees exactly the batches
  and crops the uninterrupted run would have seen.
- Model selection uses the class-disjoint validation split only; the test split is embedded for
  the best and last models at the end (and every `eval_test_every` epochs if asked), so it is
  never used to choose a model (Musgrave et al., "A Metric Learning Reality Check", 2020) and
  costs two passes, not one per epoch (one when best and last are the same checkpoint).
- One process per device under `torchrun` (DistributedDataParallel, gloo on CPU, NCCL on GPU);
  `batch_size` is per process.
- `time_budget_min` covers the method's start-up (DiVA's queue fill), training and every
  validation pass, so the run ends, closing validation included, within it; only the final test
  evaluation comes after. Training stops as soon as one more step and the closing validation
  would not fit (their costs are measured as the run goes, see `_image_s`).
- Progress goes to `on_progress` by phase ("queue", "train", "validate", "final evaluation"),
  with an ETA for the whole run; the same phases show as progress bars on a terminal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.checkpoint import (
    ModelCard,
    Preprocessing,
    load_model,
    read_card,
    save_artifact,
    weights_provenance,
)
from training.config import TrainConfig
from training.data.image_dataset import ImageDataset, drop_unreadable
from training.data.readers import check_trainable, load_dataset
from training.data.records import DatasetSplits, Split
from training.data.samplers import PKBatchSampler
from training.data.splits import class_disjoint_split, randomize_labels
from training.data.transforms import TransformConfig, build_train_transform
from training.evaluation.embed import compute_embeddings, embed_split_with_artifact
from training.evaluation.metrics import evaluate_embeddings
from training.fsutil import OutputPathError, check_output_dir
from training.methods import Batch, Method, build_method
from training.methods.base import TrainingContext
from training.models.embedding import EmbeddingModel, ModelSpec, build_for_size

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
# What results.json compares between the best model and a baseline (`TrainConfig.baseline`).
COMPARED_METRICS = ("recall@1", "map@r")
CONFIG_FILE = "config.json"
REPORT_EVERY_S = 5.0  # between progress reports within a phase (its start and end always report)


class TrainingStopped(RuntimeError):
    """Raised when `should_stop` asked the run to end early (cooperative cancel)."""


class RunDirectoryError(ValueError):
    """The output directory holds another run or a finished one."""


@dataclass
class RunData:
    """The splits a run uses, after unreadable files, class limits, validation carve-out and
    label noise have been applied."""

    dataset: DatasetSplits
    train: Split  # what the loss sees (possibly with noisy labels)
    train_clean: Split  # the same images with their true labels, for train-split evaluation
    val: Split | None
    test: Split
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def counts(split: Split | None) -> dict[str, int] | None:
            return None if split is None else {"classes": split.num_classes, "images": len(split)}

        return {
            "dataset": self.dataset.name,
            "root": str(self.dataset.root) if self.dataset.root else None,
            "train": counts(self.train),
            "val": counts(self.val),
            "test": counts(self.test),
            "skipped_unreadable": len(self.skipped),
        }


def prepare_data(cfg: TrainConfig) -> RunData:
    dataset = load_dataset(cfg.data)
    train, skipped_train = drop_unreadable(dataset.train)
    test, skipped_test = drop_unreadable(dataset.test)
    skipped = skipped_train + skipped_test
    if skipped:
        log.warning("skipped %d unreadable images, e.g. %s (%s)", len(skipped), *skipped[0])
    spare = None
    if cfg.max_classes:
        spare = train.select_classes(train.class_names[cfg.max_classes :])
        train = train.select_classes(train.class_names[: cfg.max_classes])
        test = test.select_classes(test.class_names[: cfg.max_classes])
    check_trainable(train)
    val = None
    if cfg.val_fraction > 0:
        val_classes = round(cfg.val_fraction * train.num_classes)
        if spare is not None and spare.num_classes - 2 >= val_classes >= 2:
            # Training classes that max_classes leaves out make the validation fold, so the
            # model still trains on all of the first N classes (as in docs/results.md's reference).
            _, val = class_disjoint_split(
                spare,
                val_classes / spare.num_classes,
                seed=cfg.seed,
                group_separator=cfg.val_group_separator,
            )
        else:
            train, val = class_disjoint_split(
                train, cfg.val_fraction, seed=cfg.seed, group_separator=cfg.val_group_separator
            )
    noisy = randomize_labels(train, cfg.label_noise, seed=cfg.seed) if cfg.label_noise else train
    return RunData(dataset, noisy, train, val, test, skipped)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededBatches:
    """Wraps a batch sampler so every sample carries its own augmentation seed."""

    def __init__(self, batch_sampler: Any, seed: int, rank: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.batch_sampler.set_epoch(epoch, start_batch=start_batch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for number, batch in enumerate(self.batch_sampler, start=self.start_batch):
            yield [
                (int(index), _sample_seed(self.seed, self.epoch, self.rank, number, position))
                for position, index in enumerate(batch)
            ]


def _sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


class SeededDataset(Dataset):
    """Applies the per-sample seed around the wrapped dataset's random augmentation."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style datasets are sized

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class TrainStep(nn.Module):
    """Model and method in one module, so DDP synchronises the method's parameters too."""

    def __init__(self, model: EmbeddingModel, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        return self.method.training_step(self.model, batch)


def learning_rate_factor(cfg: TrainConfig, iteration: int, per_epoch: int, total: int) -> float:
    """Warm-up, then step decay at epoch milestones or cosine decay over the planned budget."""
    factor = min(1.0, (iteration + 1) / cfg.warmup_iterations) if cfg.warmup_iterations else 1.0
    if cfg.schedule == "step":
        passed = sum(iteration >= m * per_epoch for m in cfg.milestones)
        factor *= cfg.gamma**passed
    elif cfg.schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    return factor


class Trainer:
    """Builds everything a run needs from a `TrainConfig`, then `fit()` runs it."""

    # Every time the loop reads comes from here, so a test can make time pass at will.
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress_bar: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_progress = on_progress or (lambda info: None)
        self.should_stop = should_stop or (lambda: False)
        self.progress_bar = progress_bar if progress_bar is not None else os.isatty(2)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(cfg.seed)

        self.out = Path(cfg.out or Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        # The baseline's input pixels per image over this model's: what an image costs it in
        # the final evaluation. Reading its card now also fails a missing or broken artifact
        # before training rather than after.
        self._baseline_pixel_ratio = (
            None
            if cfg.baseline is None
            else (read_card(cfg.baseline).preprocessing.image_size / cfg.image_size) ** 2
        )
        self.data = prepare_data(cfg)
        train = self.data.train
        self.method = build_method(
            cfg.method,
            num_classes=train.num_classes,
            embedding_dim=cfg.embedding_dim,
            **cfg.method_params,
        )
        spec = ModelSpec(
            backbone=cfg.backbone,
            pooling=cfg.pooling,
            head=self.method.head,
            embedding_dim=cfg.embedding_dim,
            head_options=self.method.head_options(),
            frozen_bn=cfg.frozen_bn,
        )
        self.model = build_for_size(spec, cfg.weights, cfg.image_size)
        info = self.model.backbone_info
        self.transform = TransformConfig(
            image_size=cfg.image_size,
            crop_scale=cfg.crop_scale,
            hflip=cfg.hflip,
            test_crop_pct=cfg.test_crop_pct,
            interpolation=cfg.interpolation or info.interpolation,
            mean=info.mean,
            std=info.std,
        )
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.iterations_per_epoch = cfg.iterations_per_epoch or max(
            1, len(train) // cfg.batch_size // self.world_size
        )
        self.total_iterations = cfg.iterations or self.iterations_per_epoch * (cfg.epochs or 20)
        self.context = TrainingContext(
            cfg=cfg,
            model=self.model,
            train=train,
            transform=self.transform,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            iterations_per_epoch=self.iterations_per_epoch,
            total_iterations=self.total_iterations,
            report_phase=self.report_phase,
        )
        self.method.setup(self.context)
        self.method.to(self.device)
        self.step_module: nn.Module = TrainStep(self.model, self.method)
        if self.distributed:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, find_unused_parameters=True
            )
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda it: learning_rate_factor(
                cfg, it, self.iterations_per_epoch, self.total_iterations
            ),
        )
        self.epoch = 0
        self.batch_in_epoch = 0
        self.iteration = 0
        self.elapsed = 0.0
        self.best: dict[str, Any] = {"score": -math.inf, "epoch": None, "val": None}
        self.history: list[dict[str, Any]] = []
        self._started = 0.0  # clock() when this run would have started, earlier sessions joined
        self._progress = 0.0  # the progress reported last; it never goes back
        self._last_report = -math.inf
        self._train_s, self._train_steps = 0.0, 0  # training steps timed in this session
        self._image_pass_s: float | None = None  # seconds per image of the last embedding phase
        self._epoch_start_s = 0.0  # the method's last on_epoch_start (Magnet's clustering)
        self._phase: str | None = None  # the embedding phase under way, its start and its bar
        self._phase_started = 0.0
        self._bar: tqdm | None = None

    # ---------------------------------------------------------------- set-up helpers
    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = self.model.parameter_groups()
        head_lr = cfg.head_lr or cfg.lr
        param_groups = [
            {"name": "backbone", "params": groups["backbone"], "lr": cfg.lr},
            {"name": "head", "params": groups["head"], "lr": head_lr},
        ]
        for name, (params, lr) in self.method.parameter_groups().items():
            # Method parameters (margin betas, regressors) carry no weight decay (DiVA's diva_main).
            param_groups.append(
                {"name": name, "params": params, "lr": lr or head_lr, "weight_decay": 0.0}
            )
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return optimizer(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _train_loader(self) -> tuple[DataLoader, SeededBatches]:
        cfg = self.cfg
        sampler = self.method.batch_sampler(self.context) or PKBatchSampler(
            self.data.train.labels,
            classes_per_batch=cfg.classes_per_batch,
            samples_per_class=cfg.samples_per_class,
            num_batches=self.iterations_per_epoch * self.world_size,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        seeded = SeededBatches(sampler, cfg.seed, self.rank)
        dataset = ImageDataset(
            self.data.train, build_train_transform(self.transform), views=self.method.views
        )
        loader = DataLoader(
            SeededDataset(dataset),
            batch_sampler=seeded,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            # Its own generator: creating an iterator must not draw from the global RNG, which
            # the miners use and which a resumed run restores to the interrupted run's state.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        return loader, seeded

    # ---------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "best": self.best,
            "history": self.history,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_state(self) -> None:
        if self.rank != 0:
            return
        temporary = self.out / f".{STATE_FILE}.tmp"
        torch.save(self._state(), temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(self.out / STATE_FILE)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.iteration = self.context.iteration = state["iteration"]
        self.elapsed = state["elapsed"]
        self.best = state["best"]
        self.history = state["history"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _prepare_out_dir(self) -> bool:
        """Create the run directory, or resume the unfinished run in it; True if resumed."""
        config = self.cfg.model_dump(mode="json")
        try:
            check_output_dir(self.out, "--out")
        except OutputPathError as error:
            raise RunDirectoryError(str(error)) from None
        if (self.out / RESULTS_FILE).exists():
            raise RunDirectoryError(f"{self.out} holds a finished run; choose another --out")
        state_path = self.out / STATE_FILE
        saved_config_path = self.out / CONFIG_FILE
        if saved_config_path.exists():
            saved = json.loads(saved_config_path.read_text())
            if _comparable(saved) != _comparable(config):
                raise RunDirectoryError(
                    f"{self.out} holds an unfinished run with a different configuration; "
                    "choose another --out or delete that directory"
                )
            if state_path.exists():
                self._load_state(torch.load(state_path, map_location="cpu", weights_only=False))
                log.info(
                    "resuming %s at epoch %d, iteration %d", self.out, self.epoch, self.iteration
                )
                return True
        elif self.out.exists() and any(self.out.iterdir()):
            raise RunDirectoryError(
                f"{self.out} exists and is not a lookalike run; choose another --out"
            )
        if self.rank == 0:
            # A run killed before its first snapshot starts over from scratch.
            for stale in ("best", "last"):
                shutil.rmtree(self.out / stale, ignore_errors=True)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            saved_config_path.write_text(json.dumps(config, indent=2))
        return False

    # ---------------------------------------------------------------- evaluation
    def evaluate_split(
        self,
        split: Split,
        *,
        clustering: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """Metrics of the current model on `split`; `progress(done, total)` hears of each batch."""
        embeddings, labels = compute_embeddings(
            self.model,
            split,
            self.transform,
            batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers,
            device=self.device,
            channels_last=self.cfg.channels_last,
            progress=progress,
        )
        return evaluate_embeddings(
            embeddings, labels, seed=self.cfg.seed, with_clustering=clustering
        )

    def _card(self, metrics: dict[str, Any]) -> ModelCard:
        return ModelCard(
            architecture=self.model.spec,
            embedding_dim=self.model.embedding_dim,
            preprocessing=Preprocessing(
                **self.transform.model_dump(include=set(Preprocessing.model_fields))
            ),
            method=self.method.card(),
            training_data={**self.data.summary(), "spec": self.cfg.data},
            metrics=metrics,
            backbone_weights=weights_provenance(self.model),
        )

    def _save_model(
        self, name: str, metrics: dict[str, Any], extras: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Save the current weights; `extras` default to the method's current tensors."""
        tensors = self.method.artifact_tensors() if extras is None else extras
        return save_artifact(self.out / name, self.model, self._card(metrics), tensors)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        resumed = self._prepare_out_dir()
        if self.distributed:
            dist.barrier()
        loader, batches = self._train_loader()
        self._started = self.clock() - self.elapsed  # the budget's clock runs from here
        if not resumed:
            self.method.on_train_start(self.context)
        stop = self._out_of_budget()
        if stop:
            log.warning(
                "%.0f s of the %.0f s time budget had passed before the first training step (%s), "
                "leaving no time to train and validate: the run ends with the model as it is. "
                "Raise time_budget_min.",
                self.elapsed,
                self._budget_s(),
                "a resumed run" if resumed else "the method's start-up, e.g. DiVA's queue fill",
            )
            if self.batch_in_epoch or self.epoch == 0:  # steps, or no model, since the last save
                empty: dict[str, Any] = {"loss": None, "terms": {}, "images_per_s": 0.0}
                self._end_epoch(empty, closing=True, validate=False)
        while not stop and self.iteration < self.total_iterations:
            if self.batch_in_epoch == 0:
                epoch_started = self.clock()
                self.method.on_epoch_start(self.context, self.epoch)
                self._epoch_start_s = self.clock() - epoch_started
            batches.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            epoch_log = self._run_epoch(loader)
            stop = epoch_log.pop("out_of_budget")
            if epoch_log.pop("epoch_complete"):
                stop = self._end_epoch(epoch_log, closing=stop)
        return self._finish()

    def _run_epoch(self, loader: DataLoader) -> dict[str, Any]:
        cfg = self.cfg
        self.step_module.train()
        remaining = min(
            self.iterations_per_epoch - self.batch_in_epoch, self.total_iterations - self.iteration
        )
        bar = tqdm(
            total=self.iterations_per_epoch,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch}",
            unit="it",
            disable=not self.progress_bar or self.rank != 0,
            leave=False,
        )
        losses, images_seen, wait_s, step_s = [], 0, 0.0, 0.0
        term_sums: dict[str, float] = defaultdict(float)  # the method's loss terms, per epoch
        out_of_budget = False
        fetch_started = self.clock()
        for batch_index, (images, labels, indices) in enumerate(loader):
            if batch_index >= remaining:
                break
            fetched = self.clock()
            wait_s += fetched - fetch_started
            batch = self._to_batch(images, labels, indices)
            loss, logs = self._step(batch)
            losses.append(loss)
            for term, value in logs.items():
                term_sums[term] += value
            images_seen += len(labels)
            self.iteration += 1
            self.batch_in_epoch += 1
            self.context.iteration = self.iteration
            self.method.on_step_end(self.context)
            step_ended = self.clock()
            step_s += step_ended - fetched
            self._train_s += step_ended - fetch_started
            self._train_steps += 1
            fetch_started = step_ended
            rate = images_seen / max(wait_s + step_s, 1e-9)
            bar.set_postfix(
                loss=f"{loss:.4f}",
                img_s=f"{rate:.1f}",
                data=f"{wait_s / max(wait_s + step_s, 1e-9):.0%}",
            )
            bar.update()
            self._tick()
            if self.iteration % cfg.checkpoint_every == 0:
                self.save_state()
            # The first step of a session reports at once: the phase changed, the pace is known.
            if self._train_steps == 1 or step_ended - self._last_report >= REPORT_EVERY_S:
                self._report(
                    "train",
                    self.iteration,
                    self.total_iterations,
                    loss=float(np.mean(losses[-20:])),
                    images_per_s=rate,
                    terms=logs,  # the method's own names, which may clash with the report's
                )
            if self.should_stop():
                self.save_state()
                raise TrainingStopped(f"stopped at iteration {self.iteration}")
            if self._out_of_budget():
                out_of_budget = True
                break
        bar.close()
        epoch_complete = self.batch_in_epoch >= self.iterations_per_epoch or (
            self.iteration >= self.total_iterations or out_of_budget
        )
        busy = max(wait_s + step_s, 1e-9)
        return {
            "loss": float(np.mean(losses)) if losses else None,
            "terms": {term: total / len(losses) for term, total in term_sums.items()},
            "images_per_s": images_seen / busy,
            "data_wait_fraction": wait_s / busy,
            "epoch_complete": epoch_complete,
            "out_of_budget": out_of_budget,
        }

    def _to_batch(self, images, labels, indices) -> Batch:
        views = list(images) if isinstance(images, (list, tuple)) else [images]
        memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        views = [
            v.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            for v in views
        ]
        return Batch(views, labels.to(self.device), indices.to(self.device))

    def _step(self, batch: Batch) -> tuple[float, dict]:
        autocast = torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and self.device.type == "cuda"
        )
        with autocast:
            loss, logs = self.step_module(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {self.iteration}; lower the learning rate"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.step_module.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), {k: float(v) for k, v in logs.items()}

    # ---------------------------------------------------------------- time, budget, progress
    def _tick(self) -> float:
        """Bring `elapsed` (seconds of this run so far, all its sessions) up to date."""
        self.elapsed = self.clock() - self._started
        return self.elapsed

    def _budget_s(self) -> float:
        return self.cfg.time_budget_min * 60 if self.cfg.time_budget_min else math.inf

    def _out_of_budget(self, extra_s: float = 0.0) -> bool:
        """Whether `extra_s`, one more training step and the closing validation pass would
        overrun the time budget. Rank 0, which alone validates, decides for every process, so
        all of them stop at the same step."""
        if not self.cfg.time_budget_min:
            return False
        needed = extra_s + (self._step_s() or 0.0) + self._validation_s()
        over = self._tick() + needed >= self._budget_s()
        if self.distributed:
            flag = torch.tensor([float(over)], device=self.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        return over

    def _step_s(self) -> float | None:
        """Seconds per training step: this session's mean, else the pace of the last epoch on
        record (a resumed run), else None."""
        if self._train_steps:
            return self._train_s / self._train_steps
        paces = [r["images_per_s"] for r in self.history if r.get("images_per_s")]
        return self.cfg.batch_size / paces[-1] if paces else None

    def _image_s(self) -> float | None:
        """Seconds to evaluate one image: the last validation pass's pace, else that of the last
        phase that embedded images (DiVA's queue fill), else a training step's per image, which
        errs long (a step also runs the backward pass); None before anything was timed."""
        for record in reversed(self.history):
            if record.get("val_s") and self.data.val is not None:
                return record["val_s"] / max(len(self.data.val), 1)
        if self._image_pass_s is not None:
            return self._image_pass_s
        step = self._step_s()
        return None if step is None else step / self.cfg.batch_size

    def _validation_s(self) -> float:
        """The expected cost of a validation pass: the last one's, or `_image_s` per image."""
        if self.data.val is None:
            return 0.0
        image = self._image_s()
        return 0.0 if image is None else image * len(self.data.val)

    def _validations_left(self) -> int:
        """Validation passes still to come by the iteration count: every `eval_every` epochs
        and at the last one."""
        if self.data.val is None:
            return 0
        last, every = (self.total_iterations - 1) // self.iterations_per_epoch, self.cfg.eval_every
        return sum(
            epoch == last or bool(every and (epoch + 1) % every == 0)
            for epoch in range(self.epoch, last + 1)
        )

    def _final_passes(self) -> int:
        """Models the final evaluation embeds if the run ended now: one when `best` and `last`
        are the same checkpoint (the same epoch, or nothing chose a best), else two."""
        return 1 if self.best["epoch"] in (None, self.epoch - 1) else 2

    def _final_evaluation_s(self) -> float:
        image = self._image_s()
        images: float = len(self.data.test)
        images += len(self.data.train_clean) if self.cfg.eval_train else 0
        images *= self._final_passes()
        if self._baseline_pixel_ratio is not None:
            images += len(self.data.test) * self._baseline_pixel_ratio
        return 0.0 if image is None else image * images

    def _eta_s(self, phase: str, done: int, total: int) -> float | None:
        """Seconds until the run ends, final evaluation included; None while nothing bounds it
        (no budget and no step timed yet). Before the final evaluation: the iterations left at
        the measured pace, capped by what is left of the budget, plus the final evaluation."""
        if phase == "final evaluation":
            if not done:
                return self._final_evaluation_s()
            return (self.clock() - self._phase_started) * (total - done) / done
        budget_left = max(self._budget_s() - self.elapsed, 0.0)
        step = self._step_s()
        if step is None:
            left = budget_left if math.isfinite(budget_left) else None
        else:
            by_iterations = (self.total_iterations - self.iteration) * step
            by_iterations += self._validations_left() * self._validation_s()
            left = min(by_iterations, budget_left)
        return None if left is None else left + self._final_evaluation_s()

    def _report(self, phase: str, done: int, total: int, **info: Any) -> None:
        """Tell `on_progress` the phase, how far it is (`done` of `total`: iterations while
        training, images otherwise) and `eta_s`; `progress` is elapsed / (elapsed + eta), so the
        two agree, and it never goes back when an estimate grows."""
        elapsed = self._tick()
        eta = self._eta_s(phase, done, total)
        if eta is not None:
            self._progress = max(self._progress, elapsed / max(elapsed + eta, 1e-9))
        self._last_report = self.clock()
        self.on_progress(
            {
                "phase": phase,
                "done": done,
                "total": total,
                "epoch": self.epoch,
                "iteration": self.iteration,
                "total_iterations": self.total_iterations,
                "progress": self._progress,
                "eta_s": eta,
                "elapsed_s": elapsed,
                **info,
            }
        )

    def report_phase(self, phase: str, done: int, total: int) -> None:
        """Progress of a phase that embeds images (a queue fill, validation, the final
        evaluation): a bar on a terminal, `on_progress` at its start, its end and every
        `REPORT_EVERY_S`, and a cancel check, as such a phase can take minutes. Its pace
        per image estimates the evaluation passes to come."""
        now = self.clock()
        if phase != self._phase:
            self._phase, self._phase_started = phase, now
            disable = not self.progress_bar or self.rank != 0
            self._bar = tqdm(total=total, desc=phase, unit="img", leave=False, disable=disable)
        bar = self._bar
        assert bar is not None  # made above at the phase's first report
        bar.update(done - bar.n)
        finished = done >= total
        if finished and done:
            self._image_pass_s = (now - self._phase_started) / done
        if not done or finished or now - self._last_report >= REPORT_EVERY_S:
            self._report(phase, done, total)
        stopping = self.should_stop()
        if finished or stopping:
            bar.close()
            self._phase = None
        if stopping:
            raise TrainingStopped(f"stopped during the {phase}")

    def _phase_progress(
        self, phase: str, offset: int = 0, total: int | None = None
    ) -> Callable[[int, int], None]:
        """An `evaluate_split` progress callback for `phase`, `offset` images into `total`
        (default: the split's size)."""
        return lambda done, count: self.report_phase(
            phase, offset + done, count if total is None else total
        )

    # ---------------------------------------------------------------- epoch end and final
    def _end_epoch(
        self, epoch_log: dict[str, Any], *, closing: bool, validate: bool = True
    ) -> bool:
        """Validate when due, and always when the run closes here; save `last`. True when the
        run closes: iterations done, or the budget leaves no room for one more step and the
        closing validation after this epoch's own."""
        cfg = self.cfg
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "lr": self.optimizer.param_groups[0]["lr"],
            **epoch_log,
        }
        due = bool(cfg.eval_every) and (self.epoch + 1) % cfg.eval_every == 0
        closing = (
            closing
            or self.iteration >= self.total_iterations
            or self._out_of_budget((self._validation_s() if due else 0.0) + self._epoch_start_s)
        )
        if self.rank == 0:
            eval_started = self.clock()
            if self.data.val is not None and validate and (due or closing):
                record["val"] = self.evaluate_split(
                    self.data.val, progress=self._phase_progress("validate")
                )
                record["val_s"] = self.clock() - eval_started
                score = record["val"][cfg.select_metric]
                if score > self.best["score"]:
                    self.best = {"score": score, "epoch": self.epoch, "val": record["val"]}
                    self._save_model("best", {"epoch": self.epoch, "val": record["val"]})
            if cfg.eval_test_every and (self.epoch + 1) % cfg.eval_test_every == 0:
                record["test"] = self.evaluate_split(
                    self.data.test, progress=self._phase_progress("test")
                )
            record["eval_s"] = self.clock() - eval_started
            self._save_model("last", {"epoch": self.epoch, "val": record.get("val")})
            record["elapsed_s"] = self._tick()
            self.history.append(record)
            with open(self.out / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", self.epoch, _brief(record))
        self._tick()
        self.epoch += 1
        self.batch_in_epoch = 0
        self.save_state()
        self._report(
            "train",
            self.iteration,
            self.total_iterations,
            **{k: v for k, v in record.items() if k in ("loss", "val", "images_per_s")},
        )
        if self.distributed:
            dist.barrier()
        return closing

    def _finish(self) -> dict[str, Any]:
        """Evaluate the best-by-validation and the last model on test (and train), once each;
        once in all when they are the same checkpoint, whose numbers then go to both."""
        results: dict[str, Any] = {}
        training_s = self._tick()
        if self.rank == 0:
            same = self._final_passes() == 1
            if self.best["epoch"] is None:
                shutil.rmtree(self.out / "best", ignore_errors=True)
                shutil.copytree(self.out / "last", self.out / "best")
            splits = [("test", self.data.test, True)]
            if self.cfg.eval_train:
                splits.append(("train", self.data.train_clean, False))
            names = ("best",) if same else ("best", "last")
            total = len(names) * sum(len(split) for _, split, _ in splits)
            if self.cfg.baseline is not None:
                total += len(self.data.test)
            log.info(
                "final evaluation of %s on %d images",
                "best and last, the same checkpoint," if same else "best and last",
                total,
            )
            done = 0
            for name in names:
                model, card, extras = load_model(self.out / name)
                self.model.load_state_dict(model.state_dict())
                metrics = dict(card.metrics)
                for key, split, clustering in splits:
                    progress = self._phase_progress("final evaluation", done, total)
                    metrics[key] = self.evaluate_split(
                        split, clustering=clustering, progress=progress
                    )
                    done += len(split)
                self._save_model(name, metrics, extras)
                results[name] = metrics
            if same:
                self._save_model("last", metrics, extras)
                results["last"] = dict(metrics)
            if self.cfg.baseline is not None:
                results.update(self._compare_with_baseline(results["best"]["test"], done, total))
            results["selected_by"] = f"val {self.cfg.select_metric}" if self.data.val else "last"
            throughput = [r["images_per_s"] for r in self.history if r.get("images_per_s")]
            waits = [r["data_wait_fraction"] for r in self.history if "data_wait_fraction" in r]
            results["images_per_s"] = float(np.mean(throughput)) if throughput else None
            eval_s = sum(r.get("eval_s", 0.0) for r in self.history)
            results["eval_fraction"] = eval_s / max(training_s, 1e-9)
            results["data_wait_fraction"] = float(np.mean(waits)) if waits else None
            results["iterations"] = self.iteration
            results["epochs"] = self.epoch
            results["elapsed_s"] = self._tick()
            results["out"] = str(self.out)
            (self.out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
            (self.out / STATE_FILE).unlink(missing_ok=True)  # results.json marks the run done
        if self.distributed:
            dist.barrier()
        return results

    def _compare_with_baseline(
        self, test: dict[str, float], done: int, total: int
    ) -> dict[str, Any]:
        """The baseline artifact's test metrics (its own preprocessing, the same images and
        protocol) and the best model's gain over it, for results.json."""
        assert self.cfg.baseline is not None  # called only when a baseline is set
        embeddings, labels = embed_split_with_artifact(
            self.cfg.baseline,
            self.data.test,
            device=self.device,
            batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers,
            progress=self._phase_progress("final evaluation", done, total),
        )
        metrics = evaluate_embeddings(embeddings, labels, seed=self.cfg.seed)
        return {
            "baseline": {"model": str(self.cfg.baseline), "test": metrics},
            "gain_over_baseline": {name: test[name] - metrics[name] for name in COMPARED_METRICS},
        }


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Configuration fields that must match for a resume (the budget may be extended)."""
    ignored = ("time_budget_min", "num_workers", "baseline")
    return {k: v for k, v in config.items() if k not in ignored}


def _brief(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}" if record.get("loss") is not None else ""]
    for split in ("val", "test"):
        if record.get(split):
            parts.append(f"{split} R@1 {record[split]['recall@1']:.3f}")
    parts.append(f"{record['images_per_s']:.1f} img/s")
    return ", ".join(p for p in parts if p)
