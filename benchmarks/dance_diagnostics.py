"""Why a DiVA run's DaNCE loss is what it is: the state of its sample-specific head.

Reads the snapshot (`state.pt`) of an unfinished DiVA run (a finished run deletes it; stop one
with Ctrl-C, or copy the file while it trains), embeds one training batch in both views, and
prints how similar the queries are to their positive key and to the queue, how many pairs fall
under the lower distance cutoff (where the distance weights stop discriminating), and the
DaNCE loss, the gradient norm on the queries and the number of negatives per query with
weight > 0.01, for both normalisations and several temperatures:

    python benchmarks/dance_diagnostics.py runs/i15/icons-diva-batch-s0 --temperatures 0.01 0.2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from training.config import TrainConfig
from training.engine.trainer import STATE_FILE, Trainer
from training.losses.dance import DaNCELoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a DiVA run directory holding state.pt")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2])
    args = parser.parse_args()
    state = torch.load(args.run / STATE_FILE, map_location="cpu", weights_only=False)
    scratch = Path(tempfile.mkdtemp(prefix="dance-diagnostics-"))
    cfg = TrainConfig(**{**state["config"], "out": scratch, "num_workers": 0})
    if cfg.method != "diva":
        raise SystemExit(f"{args.run} is a {cfg.method} run, not a DiVA one")
    trainer = Trainer(cfg, progress_bar=False)
    trainer.model.load_state_dict(state["model"])
    trainer.method.load_state_dict(state["method"])
    loader, batches = trainer._train_loader()
    batches.set_epoch(state["epoch"])
    views, _, _ = next(iter(loader))
    trainer.model.eval()
    with torch.no_grad():
        queries = trainer.model(views[0])["selfsimilarity"].float()
        keys = trainer.method.key_model(views[1])["selfsimilarity"].float()
    queue = trainer.method.queue
    similarities = queries @ queue.T
    distances = (2 - 2 * similarities).clamp(min=0).sqrt()
    print(f"epoch {state['epoch']}, {len(queries)} queries, queue of {len(queue)} keys")
    print(f"positive similarity: mean {(queries * keys).sum(1).mean():.3f}")
    print(
        f"queue similarity: mean {similarities.mean():.3f}, "
        f"nearest per query {similarities.max(1).values.mean():.3f}"
    )
    print(f"pairs under the 0.5 distance cutoff: {(distances < 0.5).float().mean():.1%}")
    for normalise in ("batch", "row"):
        for temperature in args.temperatures:
            loss_fn = DaNCELoss(temperature=temperature, normalise=normalise)
            leaf = queries.clone().requires_grad_(True)
            loss = loss_fn(leaf, keys, queue)
            (gradient,) = torch.autograd.grad(loss, leaf)
            heavy = (loss_fn.last_weights > 0.01).float().sum(1).mean()
            print(
                f"{normalise:5s} tau {temperature:<5g} loss {loss.item():.4f} "
                f"gradient {gradient.norm():.4f} negatives with w > 0.01: {heavy:.0f}"
            )


if __name__ == "__main__":
    main()
