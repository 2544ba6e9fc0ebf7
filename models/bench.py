"""Encoder benchmark: speed of torch vs ONNX fp32 vs ONNX int8 on MovieLens-like texts, against this machine's peak;
and (``run_incremental``) full vs incremental re-encoding of users after one new history entry.

Prints figures side by side and writes them as JSON (and a PNG); it asserts nothing. Achieved GFLOP/s
counts 2 x non-embedding parameters per real token (attention's own matmuls left out), so it is a
slight underestimate of the work done.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import random
import time
from typing import Any
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from models.artifact import ModelArtifact
from models.export import export_artifact
from models.encoder import Encoder, TorchEncoder, padding_fraction, plan_batches
from models.errors import ArtifactError
from models.render import COUNTER_FIELDS, render_item, render_user
from models.samples import MOVIES, movie_features, sample_items, sample_users
from models.tower import build_tower
from core.settings import Settings

BACKENDS = ("torch", "onnx-fp32", "onnx-int8")


@dataclass
class Plan:
    """How much to measure: --quick trades precision for a run of about a minute."""

    bases: tuple[str, ...]
    batches: tuple[int, ...]
    items: int
    users: int
    cell_s: float  # keep calling until this much time is spent in a cell (at least one call)
    max_call_s: float  # skip a cell whose single call is estimated to take longer
    max_calls: int
    parity_texts: int
    matmul_n: int


FULL = Plan(("minilm", "smollm2"), (1, 32, 256), 512, 256, 8.0, 60.0, 200, 48, 2048)
QUICK = Plan(("minilm",), (1, 32), 64, 32, 1.0, 4.0, 30, 16, 1024)


@dataclass
class Cell:
    model: str
    backend: str
    kind: str
    batch: int
    calls: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    texts_per_s: float | None = None
    tokens_per_s: float | None = None
    gflops: float | None = None
    frac_peak: float | None = None
    note: str = ""


def matmul_gflops(n: int, seconds: float = 2.0) -> dict[str, float]:
    """Best fp32 GFLOP/s of a large square matmul, in numpy and in torch (the machine's practical peak)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    result = {}
    for name, fn in (("numpy", lambda: a @ b), ("torch", lambda: ta @ tb)):
        fn()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        result[name] = 2 * n**3 / best / 1e9
    return result


def non_embedding_params(artifact: ModelArtifact) -> int:
    """Parameters that multiply every token (embedding tables are lookups)."""
    model = artifact.load_sentence_transformer()
    total = sum(p.numel() for p in model.parameters())
    return total - sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))


def bench_texts(tokenizer, max_seq_length: int, plan: Plan) -> dict[str, list[str]]:
    """Items with percentile counters; users with 30-60 engaged movies fitted to the model's context."""
    items = [render_item(f, c) for f, c in sample_items(plan.items, seed=7)]
    users = [render_user(p, h, tokenizer=tokenizer, max_tokens=max_seq_length) for p, h in sample_users(plan.users, seed=7)]
    return {"item": items, "user": users}


def measure(encoder, texts: Sequence[str], batch: int, plan: Plan, est_s_per_text: float | None) -> tuple[Cell, float]:
    """Time ``encode`` calls of ``batch`` texts taken in turn from ``texts``; returns the cell and s/text."""
    cell = Cell(model="", backend="", kind="", batch=batch)
    if est_s_per_text is not None and est_s_per_text * batch > plan.max_call_s:
        cell.note = f"skipped: ~{est_s_per_text * batch:.0f} s per call"
        return cell, est_s_per_text
    lat, tokens, start = [], 0, time.perf_counter()
    while len(lat) < plan.max_calls and (not lat or time.perf_counter() - start < plan.cell_s):
        offset = (len(lat) * batch) % len(texts)
        chunk = [texts[(offset + j) % len(texts)] for j in range(batch)]
        tokens += sum(len(x) for x in encoder.tokenize(chunk))
        t = time.perf_counter()
        encoder.encode(chunk)
        lat.append(time.perf_counter() - t)
    total = sum(lat)
    cell.calls = len(lat)
    cell.p50_ms, cell.p99_ms = (float(np.percentile(lat, q)) * 1e3 for q in (50, 99))
    cell.texts_per_s = batch * len(lat) / total
    cell.tokens_per_s = tokens / total
    return cell, total / (batch * len(lat))


def _parity(reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = np.sum(reference * got, axis=1)
    return {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


def bench_model(base: str, plan: Plan, work: Path, peak: float, console: Console, threads: int | None,
                settings: Settings) -> tuple[list[Cell], dict]:
    """All cells for one base model (its artifact is exported once into ``work`` and reused)."""
    out = work / f"artifact-{base}"
    try:
        artifact = ModelArtifact.load(out)
        if artifact.manifest.base_model != base or "int8" not in artifact.manifest.onnx:
            raise ArtifactError("stale")
    except ArtifactError:
        console.print(f"exporting the untuned {base} tower to {out}")
        tower = build_tower(base, dim=settings.embedding_dim, max_seq_length=settings.max_seq_length, cache_dir=settings.cache_dir)
        artifact = export_artifact(tower, out, base_model=base, int8=True, overwrite=True)
    encoders = {
        "torch": TorchEncoder.load(out),
        "onnx-fp32": Encoder.load(out, variant="fp32", provider="cpu", threads=threads),
        "onnx-int8": Encoder.load(out, variant="int8", provider="cpu", threads=threads),
    }
    flops_per_token = 2 * non_embedding_params(artifact)
    texts = bench_texts(encoders["onnx-fp32"].tokenizer, artifact.manifest.max_seq_length, plan)
    info: dict = {"version": artifact.version, "flops_per_token": flops_per_token, "padding": {}, "parity": {}}
    for kind, pool in texts.items():
        lengths = [len(x) for x in encoders["onnx-fp32"].tokenize(pool)]
        info[f"mean_tokens_{kind}"] = float(np.mean(lengths))
        info["padding"][kind] = round(padding_fraction(lengths, plan_batches(lengths, 8192)), 4)
    mixed = [len(x) for x in encoders["onnx-fp32"].tokenize(texts["item"] + texts["user"])]
    info["padding"]["mixed"] = round(padding_fraction(mixed, plan_batches(mixed, 8192)), 4)
    probe = texts["item"][: plan.parity_texts] + texts["user"][: plan.parity_texts // 4]
    reference = encoders["torch"].encode(probe)
    for name in ("onnx-fp32", "onnx-int8"):
        info["parity"][name] = _parity(reference, encoders[name].encode(probe))

    cells = []
    jobs = [(kind, backend) for kind in texts for backend in BACKENDS]
    for kind, backend in track(jobs, description=f"{base}: timing", console=console, transient=True):
        encoders[backend].encode(texts[kind][:2])  # warm-up: first-run allocations and graph setup
        est = None
        for batch in plan.batches:
            cell, est = measure(encoders[backend], texts[kind], batch, plan, est)
            cell.model, cell.backend, cell.kind = base, backend, kind
            if cell.tokens_per_s:
                cell.gflops = cell.tokens_per_s * flops_per_token / 1e9
                cell.frac_peak = cell.gflops / peak
            cells.append(cell)
    return cells, info


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def results_table(cells: list[Cell], peak: float) -> Table:
    table = Table(title=f"encoder speed (this machine's fp32 matmul peak: {peak:.0f} GFLOP/s)")
    for col in ("model", "text", "backend", "batch", "texts/s", "tokens/s", "p50 ms", "p99 ms", "GFLOP/s", "of peak", "note"):
        table.add_column(col, justify="left" if col in ("model", "text", "backend", "note") else "right")
    for c in cells:
        table.add_row(
            c.model, c.kind, c.backend, str(c.batch), _fmt(c.texts_per_s, ".1f"), _fmt(c.tokens_per_s, ".0f"),
            _fmt(c.p50_ms, ".1f"), _fmt(c.p99_ms, ".1f"), _fmt(c.gflops, ".1f"),
            _fmt(c.frac_peak and 100 * c.frac_peak, ".0f") + ("%" if c.frac_peak else ""), c.note,
        )  # fmt: skip
    return table


def _plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c.model, c.kind, c.batch) for c in cells})
    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 0.9), 4))
    width = 0.8 / len(BACKENDS)
    for k, backend in enumerate(BACKENDS):
        values = [next((c.tokens_per_s or 0 for c in cells if (c.model, c.kind, c.batch) == g and c.backend == backend), 0) for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=backend)
    ax.set_xticks(np.arange(len(groups)) + width, [f"{m}\n{k} b{b}" for m, k, b in groups], fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    out: Path,
    settings: Settings,
    *,
    quick: bool = False,
    bases: Sequence[str] | None = None,
    threads: int | None = None,
    console: Console | None = None,
) -> dict:
    """Run the benchmark, print its tables, and write ``bench_encoder.json`` and ``.png`` under ``out``.

    ``threads`` sets torch's and onnxruntime's intra-op threads (default: their own, one per core). The
    load average is recorded: on a shared machine, torch's OpenMP threads slow down badly when
    oversubscribed, so read figures next to it.
    """
    console = console or Console()
    plan = QUICK if quick else FULL
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    matmul = matmul_gflops(plan.matmul_n)
    peak = max(matmul.values())
    console.print(f"fp32 matmul {plan.matmul_n}x{plan.matmul_n}: numpy {matmul['numpy']:.0f}, torch {matmul['torch']:.0f} GFLOP/s")
    cells, models = [], {}
    for base in bases or plan.bases:
        got, models[base] = bench_model(base, plan, out, peak, console, threads, settings)
        cells += got
    wide = console if console.width >= 150 else Console(width=150, file=console.file)  # do not fold the tables
    wide.print(results_table(cells, peak))
    summary = Table(title="padding of token-budget batching (8192 tokens) and parity vs torch (min / mean cosine)")
    for col in ("model", "mean tokens item/user", "padding item", "padding user", "padding mixed", "onnx-fp32", "onnx-int8"):
        summary.add_column(col)
    for base, info in models.items():
        summary.add_row(
            base, f"{info['mean_tokens_item']:.0f} / {info['mean_tokens_user']:.0f}",
            *(f"{100 * info['padding'][k]:.1f}%" for k in ("item", "user", "mixed")),
            *(f"{info['parity'][n]['min']:.4f} / {info['parity'][n]['mean']:.4f}" for n in ("onnx-fp32", "onnx-int8")),
        )  # fmt: skip
    wide.print(summary)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "matmul_gflops": matmul,
            "peak_gflops": peak,
        },
        "plan": asdict(plan),
        "models": models,
        "cells": [asdict(c) for c in cells],
    }
    (out / "bench_encoder.json").write_text(json.dumps(result, indent=2))
    _plot(cells, out / "bench_encoder.png")
    console.print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    console.print(f"wrote {out / 'bench_encoder.json'} and {out / 'bench_encoder.png'}")
    return result


@dataclass
class IncrementalCell:
    path: str
    entities: int
    seconds: float
    per_s: float
    tokens_each: float
    min_cosine: float | None = None
    mean_cosine: float | None = None
    cache_bytes_each: float | None = None


def incremental_texts(tokenizer, users: int, *, history_tokens: int = 250, entry_tokens: int = 30,
                      seed: int = 11) -> tuple[list[str], list[str]]:
    """(before, after) user texts: a history of about ``history_tokens``, then one more entry of about
    ``entry_tokens`` (the longest-rendering movies, so the entry is near that size)."""
    rng = random.Random(seed)
    size = {i: len(tokenizer(render_item(movie_features(i)), add_special_tokens=False)["input_ids"]) for i in range(len(MOVIES))}
    long = sorted(size, key=lambda i: abs(size[i] - entry_tokens))[:10]
    before, after = [], []
    for profile, _ in sample_users(users, seed=seed, history=(0, 0)):
        history: list[dict] = []
        while len(tokenizer(render_user(profile, history))["input_ids"]) < history_tokens:
            history.append(movie_features(rng.randrange(len(MOVIES))))
        before.append(render_user(profile, history))
        after.append(render_user(profile, [*history, movie_features(rng.choice(long))]))
    return before, after


def item_counter_texts(items: int, seed: int = 13) -> tuple[list[str], list[str]]:
    """(before, after) item texts: MovieLens movies with all six counters as percentile buckets, then the
    same with an impression and an engagement in the last hour (the first counter changes: every counter
    token is computed again, the features' tokens are not)."""
    rng = random.Random(seed)
    before, after = [], []
    for i in range(items):
        counts = {name: rng.randint(1, 100) for name in COUNTER_FIELDS}
        features = movie_features(i)
        before.append(render_item(features, {**counts, "impressions_1h": 1, "engagements_1h": 1}))
        after.append(render_item(features, {**counts, "impressions_1h": 97, "engagements_1h": 99}))
    return before, after


def _timed(fn, spent: float = 0.0) -> tuple[np.ndarray, float]:
    """``fn()`` and ``spent`` plus the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, spent + time.perf_counter() - start


def _time_incremental(full: dict[str, Any], incremental: dict[str, Any], before: list[str], after: list[str], rounds: int,
                      batch: int) -> tuple[list[IncrementalCell], str]:
    """Full and incremental re-encoding of the same entities from ``before`` to ``after``, ``batch`` entities a
    call, interleaved round by round so that a change in the machine's load hits every path alike; the
    incremental caches are primed (untimed) once and restored before each round. Cosines are against the
    first full path."""
    from models.incremental import shared_prefix

    keys = [f"e{i}" for i in range(len(after))]
    chunks = [slice(i, i + batch) for i in range(0, len(after), batch)]
    primed = {}
    for name, encoder in incremental.items():
        encoder.cache.clear()
        encoder.encode(keys, before)
        primed[name] = copy.deepcopy(encoder.cache)
    for encoder in full.values():
        encoder.encode(after[:2])  # warm-up
    full_s, incremental_s = dict.fromkeys(full, 0.0), dict.fromkeys(incremental, 0.0)  # a name may be on both sides
    cosines: dict[str, list[np.ndarray]] = {name: [] for name in incremental}
    for _ in range(rounds):
        for name, encoder in full.items():
            got, full_s[name] = _timed(lambda: np.concatenate([encoder.encode(after[c]) for c in chunks]), full_s[name])
            reference = got if name == next(iter(full)) else reference
        for name, encoder in incremental.items():
            encoder.cache = copy.deepcopy(primed[name])
            got, incremental_s[name] = _timed(lambda: np.concatenate([encoder.encode(keys[c], after[c]) for c in chunks]),
                                              incremental_s[name])
            cosines[name].append(np.sum(reference * got, axis=1))
    tokenizer = next(iter(incremental.values())).tokenizer
    ids_before, ids_after = (tokenizer(texts, truncation=True, max_length=512)["input_ids"] for texts in (before, after))
    full_tokens = float(np.mean([len(x) for x in ids_after]))
    new_tokens = float(np.mean([len(b) - shared_prefix(np.asarray(a), b) for a, b in zip(ids_before, ids_after)]))
    n = len(after) * rounds
    cells = [IncrementalCell(f"full ({name})", n, full_s[name], n / full_s[name], full_tokens) for name in full]
    for name, encoder in incremental.items():
        cos = np.concatenate(cosines[name])
        cells.append(IncrementalCell(f"incremental ({name})", n, incremental_s[name], n / incremental_s[name], new_tokens,
                                     round(float(cos.min()), 6), round(float(cos.mean()), 6), encoder.cache_bytes / len(after)))
    return cells, f"{len(after)} x {rounds} rounds, {batch} a call, {new_tokens:.0f} new of {full_tokens:.0f} tokens"


def _incremental_table(cells: list[IncrementalCell], title: str, entity: str) -> Table:
    table = Table(title=title)
    fastest_full = max(c.per_s for c in cells if c.min_cosine is None)
    for col in ("path", f"{entity}s/s", f"ms/{entity}", "x full", f"tokens computed/{entity}", "min cos vs full", "mean cos", f"cache/{entity}"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for c in cells:
        table.add_row(c.path, f"{c.per_s:.2f}", f"{1e3 * c.seconds / c.entities:.0f}", f"{c.per_s / fastest_full:.2f}",
                      f"{c.tokens_each:.0f}", _fmt(c.min_cosine, ".6f"), _fmt(c.mean_cosine, ".6f"),
                      "-" if c.cache_bytes_each is None else f"{c.cache_bytes_each / 2**20:.2f} MiB")
    return table


def run_incremental(out: Path, settings: Settings, *, base: str = "smollm2", users: int = 16, rounds: int = 3, threads: int | None = None,
                    device: str = "cpu", console: Console | None = None) -> dict:
    """Full vs incremental re-encoding, side by side in one run, of users after one new entry and of items
    after their counters moved, each one a call (as a quiet refresher round meets them) and all in one call;
    prints a table each and writes ``bench_incremental.json`` under ``out``.

    Full: the torch tower and the exported ONNX graph (the refresher's full path), batched by token
    budget. Incremental: the torch model and the exported ONNX decoder with past keys/values, with
    float32 and float16 cached keys/values; only the tokens after the shared prefix are computed. "x full"
    is against the faster full path. On another ``device`` (a GPU) the torch paths run there and the
    ONNX ones are left out: onnxruntime's decoder runs on its CPU provider."""
    from models.incremental import IncrementalEncoder, OnnxDecoder

    console = console or Console()
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    tower = build_tower(base, dim=settings.embedding_dim, max_seq_length=512, cache_dir=settings.cache_dir)
    threads_used = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    tower.to(device)  # the torch paths run on ``device``; the ONNX ones only on the CPU
    full, decoders = {"torch": TorchEncoder(tower)}, {"torch": None}
    if torch.device(device).type == "cpu":
        artifact = export_artifact(tower, out / f"{Path(base).name}_incremental", version="bench", base_model=base, overwrite=True)
        full["onnx"] = Encoder.load(artifact.path, provider="cpu", threads=threads_used)
        decoders["onnx"] = OnnxDecoder(artifact.decoder_path, threads=threads_used)
    incremental = {f"{backend}, {dtype.replace('float', 'fp')} KV": IncrementalEncoder(tower, version="bench", kv_dtype=dtype, decoder=decoder)
                   for backend, decoder in decoders.items() for dtype in ("float32", "float16")}
    result: dict[str, Any] = {"base": base, "device": device, "threads": threads_used, "users": users, "items": 4 * users,
                              "rounds": rounds, "tables": []}
    for entity, (before, after) in (("user", incremental_texts(tower.tokenizer, users)), ("item", item_counter_texts(4 * users))):
        what = "after one new entry" if entity == "user" else "after its last-hour counters moved"
        for batch in (1, len(after)):
            cells, detail = _time_incremental(full, incremental, before, after, rounds, batch)
            console.print(_incremental_table(cells, f"re-encoding a{'n' if entity == 'item' else ''} {entity} {what}: {base}, {detail}, "
                                                    f"{device}, {threads_used} threads", entity))
            result["tables"].append({"entity": entity, "batch": batch, "cells": [asdict(c) for c in cells]})
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
    console.print(f"load average before/after {load_before[0]:.1f} / {result['load_average_after'][0]:.1f} on {os.cpu_count()} cores")
    (out / "bench_incremental.json").write_text(json.dumps(result, indent=2))
    return result
