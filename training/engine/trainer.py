"""A small, complete training loop shared by every method.

What it does beyond the textbook loop, and why:
- Augmentation randomness is a function of (seed, epoch, batch, position), not of worker
  scheduling, so a run killed mid-epoch and resumed from its snapshot sees exactly the batches
  and crops the uninterrupted run would have seen.
- Model selection uses the class-disjoint validation split only; the test split is embedded for
  the best and last models at the end (and every `eval_test_every` epochs if asked), so it is
  never used to choose a model (MLRC, methods.md §4.4) and costs two passes, not one per epoch.
- One process per device under `torchrun` (DistributedDataParallel, gloo on CPU, NCCL on GPU);
  `batch_size` is per process.
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

from training.checkpoint import ModelCard, Preprocessing, load_model, save_artifact
from training.config import TrainConfig
from training.data.image_dataset import ImageDataset, drop_unreadable
from training.data.readers import check_trainable, load_dataset
from training.data.records import DatasetSplits, Split
from training.data.samplers import PKBatchSampler
from training.data.splits import class_disjoint_split, randomize_labels
from training.data.transforms import TransformConfig, build_train_transform
from training.evaluation.embed import compute_embeddings
from training.evaluation.metrics import evaluate_embeddings
from training.methods import Batch, Method, build_method
from training.models.embedding import EmbeddingModel, ModelSpec

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


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
            # model still trains on all of the first N classes (how data.md's figures were made).
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
        return len(self.dataset)

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
        self.model = EmbeddingModel(spec, weights=cfg.weights)
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
        self.method.setup(self)
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
            # Method parameters (margin betas, regressors) carry no weight decay (DiVA §1.4).
            param_groups.append(
                {"name": name, "params": params, "lr": lr or head_lr, "weight_decay": 0.0}
            )
        param_groups = [g for g in param_groups if g["params"]]
        optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return optimizer(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _train_loader(self) -> tuple[DataLoader, SeededBatches]:
        cfg = self.cfg
        sampler = self.method.batch_sampler(self) or PKBatchSampler(
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
        self.iteration = state["iteration"]
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
    def evaluate_split(self, split: Split, *, clustering: bool = True) -> dict[str, float]:
        embeddings, labels = compute_embeddings(
            self.model,
            split,
            self.transform,
            batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers,
            device=self.device,
            channels_last=self.cfg.channels_last,
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
        started = time.perf_counter() - self.elapsed
        if not resumed:
            self.method.on_train_start(self)
        budget_s = self.cfg.time_budget_min * 60 if self.cfg.time_budget_min else math.inf
        out_of_budget = False
        while self.iteration < self.total_iterations and not out_of_budget:
            if self.batch_in_epoch == 0:
                self.method.on_epoch_start(self, self.epoch)
            batches.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            epoch_log = self._run_epoch(loader, started, budget_s)
            out_of_budget = epoch_log.pop("out_of_budget")
            if epoch_log.pop("epoch_complete"):
                self._end_epoch(epoch_log, started)
        return self._finish(started)

    def _run_epoch(self, loader: DataLoader, started: float, budget_s: float) -> dict[str, Any]:
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
        last_report = time.perf_counter()
        out_of_budget = False
        fetch_started = time.perf_counter()
        for batch_index, (images, labels, indices) in enumerate(loader):
            if batch_index >= remaining:
                break
            fetched = time.perf_counter()
            wait_s += fetched - fetch_started
            batch = self._to_batch(images, labels, indices)
            loss, logs = self._step(batch)
            losses.append(loss)
            for term, value in logs.items():
                term_sums[term] += value
            images_seen += len(labels)
            self.iteration += 1
            self.batch_in_epoch += 1
            self.method.on_step_end(self)
            fetch_started = time.perf_counter()
            step_s += fetch_started - fetched
            rate = images_seen / max(wait_s + step_s, 1e-9)
            bar.set_postfix(
                loss=f"{loss:.4f}",
                img_s=f"{rate:.1f}",
                data=f"{wait_s / max(wait_s + step_s, 1e-9):.0%}",
            )
            bar.update()
            self.elapsed = fetch_started - started
            if self.iteration % cfg.checkpoint_every == 0:
                self.save_state()
            if fetch_started - last_report > 5:
                last_report = fetch_started
                self._report(loss=float(np.mean(losses[-20:])), images_per_s=rate, **logs)
            if self.should_stop():
                self.save_state()
                raise TrainingStopped(f"stopped at iteration {self.iteration}")
            if self.elapsed >= budget_s:
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

    def _report(self, **info: Any) -> None:
        self.on_progress(
            {
                "epoch": self.epoch,
                "iteration": self.iteration,
                "total_iterations": self.total_iterations,
                "progress": self.iteration / self.total_iterations,
                "elapsed_s": self.elapsed,
                **info,
            }
        )

    def _end_epoch(self, epoch_log: dict[str, Any], started: float) -> None:
        cfg = self.cfg
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "lr": self.optimizer.param_groups[0]["lr"],
            **epoch_log,
        }
        last_epoch = self.iteration >= self.total_iterations
        if self.rank == 0:
            eval_started = time.perf_counter()
            due = cfg.eval_every and (self.epoch + 1) % cfg.eval_every == 0
            if self.data.val is not None and (due or last_epoch):
                record["val"] = self.evaluate_split(self.data.val)
                score = record["val"][cfg.select_metric]
                if score > self.best["score"]:
                    self.best = {"score": score, "epoch": self.epoch, "val": record["val"]}
                    self._save_model("best", {"epoch": self.epoch, "val": record["val"]})
            if cfg.eval_test_every and (self.epoch + 1) % cfg.eval_test_every == 0:
                record["test"] = self.evaluate_split(self.data.test)
            record["eval_s"] = time.perf_counter() - eval_started
            self._save_model("last", {"epoch": self.epoch, "val": record.get("val")})
            self.elapsed = time.perf_counter() - started
            record["elapsed_s"] = self.elapsed
            self.history.append(record)
            with open(self.out / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", self.epoch, _brief(record))
        self.epoch += 1
        self.batch_in_epoch = 0
        self.save_state()
        self._report(**{k: v for k, v in record.items() if k in ("loss", "val", "images_per_s")})
        if self.distributed:
            dist.barrier()

    def _finish(self, started: float) -> dict[str, Any]:
        """Evaluate the best-by-validation and the last model on test (and train), once."""
        results: dict[str, Any] = {}
        if self.rank == 0:
            if self.data.val is None or self.best["epoch"] is None:
                shutil.rmtree(self.out / "best", ignore_errors=True)
                shutil.copytree(self.out / "last", self.out / "best")
            for name in ("best", "last"):
                model, card, extras = load_model(self.out / name)
                self.model.load_state_dict(model.state_dict())
                metrics = dict(card.metrics)
                metrics["test"] = self.evaluate_split(self.data.test)
                if self.cfg.eval_train:
                    metrics["train"] = self.evaluate_split(self.data.train_clean, clustering=False)
                self._save_model(name, metrics, extras)
                results[name] = metrics
            results["selected_by"] = f"val {self.cfg.select_metric}" if self.data.val else "last"
            throughput = [r["images_per_s"] for r in self.history if r.get("images_per_s")]
            waits = [r["data_wait_fraction"] for r in self.history if "data_wait_fraction" in r]
            results["images_per_s"] = float(np.mean(throughput)) if throughput else None
            eval_s = sum(r.get("eval_s", 0.0) for r in self.history)
            results["eval_fraction"] = eval_s / max(self.elapsed, 1e-9)
            results["data_wait_fraction"] = float(np.mean(waits)) if waits else None
            results["iterations"] = self.iteration
            results["epochs"] = self.epoch
            results["elapsed_s"] = time.perf_counter() - started
            results["out"] = str(self.out)
            (self.out / RESULTS_FILE).write_text(json.dumps(results, indent=2))
            (self.out / STATE_FILE).unlink(missing_ok=True)  # results.json marks the run done
        if self.distributed:
            dist.barrier()
        return results


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Configuration fields that must match for a resume (the budget may be extended)."""
    return {k: v for k, v in config.items() if k not in ("time_budget_min", "num_workers")}


def _brief(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}" if record.get("loss") is not None else ""]
    for split in ("val", "test"):
        if record.get(split):
            parts.append(f"{split} R@1 {record[split]['recall@1']:.3f}")
    parts.append(f"{record['images_per_s']:.1f} img/s")
    return ", ".join(p for p in parts if p)
