"""Training-step benchmark: seconds a step and peak memory of each recipe, side by side in one run.

Why the causal tower is trained on a GPU: on a small CPU its steps cost many times MiniLM's, and a
plain batch of 32 may not fit in memory at all. Each case runs in its own process (so its peak RSS
is its own) with the recipe's LoRA adapter, logQ loss and Matryoshka widths, on the first examples
of the recipe's dataset: read from the topics as ``onetower train`` does (the stack up, MovieLens
replayed), or from a prepared dataset given per base model with ``--prepared``. The first step is a
warm-up and is not timed.

    python benchmarks/bench_train.py --case training/configs/movielens-minilm.yaml:32 \\
        --case training/configs/movielens-minilm.yaml:32:8 \\
        --case training/configs/movielens-smollm2-gpu.yaml:32:8 --steps 2 --threads 2 \\
        [--prepared smollm2=DIR --prepared minilm=DIR]

A case is CONFIG:BATCH, or CONFIG:BATCH:MINI_BATCH for the gradient-cached loss.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Case:
    config: Path
    batch: int
    mini_batch: int | None

    @classmethod
    def parse(cls, text: str) -> "Case":
        config, batch, *mini = text.split(":")
        return cls(Path(config), int(batch), int(mini[0]) if mini else None)

    @property
    def label(self) -> str:
        cache = f", gradient cache {self.mini_batch}" if self.mini_batch else ""
        return f"{self.config.stem}, batch {self.batch}{cache}"


def _run_case(case: Case, steps: int, threads: int, prepared: dict[str, Path]) -> dict:
    """Child process: build the recipe's tower and loss, take ``steps + 1`` optimiser steps."""
    import torch

    from core.settings import Settings
    from training.config import load_config
    from training.dataset import load_or_build, load_prepared
    from training.train import initial_model, make_loss, pair_dataset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_config(case.config, {"batch_size": case.batch, "gradient_cache": case.mini_batch is not None,
                                       "mini_batch_size": case.mini_batch})
    settings = Settings()
    directory = prepared.get(config.base_model)
    data = load_prepared(directory) if directory else load_or_build(settings, config.dataset_options())
    rows = pair_dataset(data.splits["train"].slice(0, case.batch * (steps + 1)), config.hard_negatives, logq=config.logq)
    model = initial_model(config, settings)
    model.train()
    loss_fn = make_loss(model, config)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    columns = [c for c in rows.column_names if c != "label"]
    seconds = []
    for step in range(steps + 1):
        batch = rows[step * case.batch:(step + 1) * case.batch]
        start = time.perf_counter()
        loss = loss_fn([model.preprocess(batch[c]) for c in columns], torch.tensor(batch["label"]))
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        if step:
            seconds.append(time.perf_counter() - start)
    return {"s_per_step": sum(seconds) / len(seconds), "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "train_examples": data.splits["train"].num_rows}


def measure(case: Case, steps: int, threads: int, prepared: dict[str, Path]) -> dict:
    """One case in a fresh process; a process killed (for memory, say) is reported, not raised."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_run_case, case, steps, threads, prepared).result()
        except BrokenProcessPool:
            return {"failed": "the process died (killed for memory?)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, type=Case.parse, help="CONFIG:BATCH[:MINI_BATCH]")
    parser.add_argument("--steps", type=int, default=2, help="timed steps a case (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepared", action="append", default=[], metavar="BASE=DIR",
                        help="read this base model's cases from a prepared dataset (onetower train --prepare-only)")
    args = parser.parse_args()
    prepared = {base: Path(directory) for base, directory in (p.split("=", 1) for p in args.prepared)}
    console = Console(width=150)
    results = []
    for case in args.case:
        console.print(f"[bold]{case.label}[/]: {args.steps + 1} steps ...")
        results.append((case, measure(case, args.steps, args.threads, prepared)))
    table = Table("case", "s / step", "s / example", "x first case", "peak RSS GiB", "train examples", "an epoch, h",
                  title=f"training steps on {args.threads} threads")
    base = next((r["s_per_step"] / c.batch for c, r in results if "failed" not in r), None)
    for case, r in results:
        if "failed" in r:
            table.add_row(case.label, r["failed"], "", "", "", "", "")
            continue
        per_example = r["s_per_step"] / case.batch
        table.add_row(case.label, f"{r['s_per_step']:.1f}", f"{per_example:.2f}", f"{per_example / base:.1f}",
                      f"{r['peak_gib']:.1f}", f"{r['train_examples']:,}", f"{per_example * r['train_examples'] / 3600:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
