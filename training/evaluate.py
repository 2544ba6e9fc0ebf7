"""Retrieval quality over the whole catalogue: recall@10/50/100 and NDCG@10, overall and on cold slices.

Every method (a tower at each Matryoshka width, popularity, ALS) is reduced to a score matrix
(queries x catalogue); one ranking function turns it into metrics, so all rows are comparable.
A query is one engagement of the evaluated window: the user as of t against the catalogue as the
index held it at the window's start. One exclusion rule for every method, the one serving applies
(``exclude_seen``): items the user engaged with before t are filtered out. Baselines are fitted on
everything before the scored window (train + validation when scoring test), which is what the
tower's catalogue counters and user histories see too. Cold slices: target items never engaged
before the window, users without an engagement before it.

Every recall comes with a 95% bootstrap interval over the queries, and each tuned tower is compared
with ALS and the untuned tower on the same queries (paired bootstrap of the difference): a slice of a
few dozen queries moves by several points with one query, and the intervals say which differences
are more than that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
from scipy.sparse import csr_matrix
from scipy.stats import bootstrap
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

from core.settings import MATRYOSHKA_WIDTHS
from models.tower import truncate
from training.dataset import SPLITS, PointInTimeDataset

log = logging.getLogger(__name__)

KS = (10, 50, 100)
NDCG_K = 10
SLICES = ("overall", "cold items", "cold users")
RESAMPLES = 1000  # bootstrap resamples of the queries (seeded): intervals reproduce run to run


def widths_for(full: int, widths: Iterable[int] = MATRYOSHKA_WIDTHS) -> list[int]:
    """The Matryoshka widths of a tower whose embedding has ``full`` dimensions, full included."""
    return sorted({w for w in widths if w < full} | {full})


def ranks(scores: np.ndarray, target: np.ndarray, exclude: list[np.ndarray]) -> np.ndarray:
    """1-based rank of each query's target among the non-excluded items; ties go to the lower index.
    A target without a finite score (a diverged model's NaN) ranks last: it can never count as a hit."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    for q, idx in enumerate(exclude):
        scores[q, idx] = -np.inf
    rows = np.arange(len(target))
    own = scores[rows, target][:, None]
    before = np.arange(scores.shape[1])[None, :] < target[:, None]
    rank = 1 + (scores > own).sum(axis=1) + ((scores == own) & before).sum(axis=1)
    return np.where(np.isfinite(own[:, 0]), rank, scores.shape[1])


def metrics(rank: np.ndarray, ks: Iterable[int] = KS) -> dict[str, float]:
    """Recall@k (one relevant item per query: the hit rate) and NDCG@10 from 1-based ranks."""
    if len(rank) == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, f"ndcg@{NDCG_K}": float("nan")}
    out = {f"recall@{k}": float(np.mean(rank <= k)) for k in ks}
    out[f"ndcg@{NDCG_K}"] = float(np.mean(np.where(rank <= NDCG_K, 1.0 / np.log2(rank + 1), 0.0)))
    return out


def _mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return samples[0].mean(axis=axis)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def recall_interval(rank: np.ndarray, k: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of recall@k over the queries (nan for no query)."""
    if len(rank) < 2:
        return float("nan"), float("nan")
    ci = bootstrap(((rank <= k).astype(np.float64),), _mean, n_resamples=RESAMPLES, method="percentile",
                   vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def difference_interval(rank: np.ndarray, reference: np.ndarray, k: int, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of recall@k(rank) - recall@k(reference) over the same queries."""
    if len(rank) < 2:
        return float("nan"), float("nan")
    ci = bootstrap(((rank <= k).astype(np.float64), (reference <= k).astype(np.float64)), _mean_difference,
                   paired=True, n_resamples=RESAMPLES, method="percentile", vectorized=True,
                   rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class EvalSet:
    """Queries of one window against one catalogue snapshot, with what the baselines need."""

    queries: list[str]
    catalogue_ids: list[str]
    catalogue_texts: list[str]
    split: str  # the scored window; baselines fit on the windows before it
    target: np.ndarray  # index into the catalogue
    history: list[np.ndarray]  # catalogue indices of the user's positives before t: excluded, and ALS's fold-in
    user_ids: list[str]
    slices: dict[str, np.ndarray]  # slice name -> boolean mask over queries
    key: list[tuple[int, str, str]]  # (ts, user, item) per query: proves two variants hold the same queries

    @classmethod
    def from_dataset(cls, data: PointInTimeDataset, split: str = "test", *, max_queries: int | None = None,
                     seed: int = 0, only: str | None = None) -> "EvalSet":
        """The ``split``'s engagements with a catalogue item (``only``: those of one slice, e.g. every cold-item
        engagement, since a sample of all leaves too few to measure), a seeded sample of ``max_queries``."""
        if only is not None and only not in SLICES:
            raise ValueError(f"unknown slice {only!r}; expected one of {', '.join(SLICES)}")
        table: pa.Table = data.splits[split]
        catalogue = data.catalogues[split]
        ids = catalogue.column("item_id").to_pylist()
        index = {x: i for i, x in enumerate(ids)}
        before = _before(data, split)
        seen_users = set(before.column("user_id").to_pylist())
        seen_items = set(before.column("item_id").to_pylist())
        in_slice = {"overall": lambda user, item: True, "cold items": lambda user, item: item not in seen_items,
                    "cold users": lambda user, item: user not in seen_users}[only or "overall"]
        pairs = zip(table.column("user_id").to_pylist(), table.column("item_id").to_pylist())
        keep = np.array([i for i, (user, item) in enumerate(pairs) if item in index and in_slice(user, item)], dtype=np.int64)
        if max_queries is not None and len(keep) > max_queries:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_queries, replace=False))
        if len(keep) == 0:
            raise ValueError(f"the {split} window has no engagement with a catalogue item to evaluate")
        rows = table.take(pa.array(keep)).to_pydict()

        def idx(xs: list[str]) -> np.ndarray:
            return np.array([index[x] for x in xs if x in index], dtype=np.int64)

        return cls(
            queries=rows["query"], catalogue_ids=ids, catalogue_texts=catalogue.column("text").to_pylist(), split=split,
            target=np.array([index[x] for x in rows["item_id"]], dtype=np.int64),
            history=[idx(x) for x in rows["history"]], user_ids=rows["user_id"],
            slices={"overall": np.ones(len(keep), dtype=bool),
                    "cold items": np.array([x not in seen_items for x in rows["item_id"]]),
                    "cold users": np.array([u not in seen_users for u in rows["user_id"]])},
            key=list(zip(rows["ts_ms"], rows["user_id"], rows["item_id"])),
        )

    def score_metrics(self, scores: np.ndarray) -> dict[str, dict[str, float]]:
        """Metrics per slice of one score matrix."""
        rank = self.ranks(scores)
        return {name: metrics(rank[mask]) for name, mask in self.slices.items()}

    def ranks(self, scores: np.ndarray) -> np.ndarray:
        """Each query's target rank under one score matrix (the exclusion rule applied)."""
        return ranks(scores, self.target, self.history)


# ---------------------------------------------------------------- methods


def tower_scores(model: SentenceTransformer, ev: EvalSet, *, batch_size: int = 64,
                 show_progress_bar: bool = False) -> dict[int, np.ndarray]:
    """Score matrices of a tower at each Matryoshka width (truncated and renormalised, as served)."""
    q = model.encode(ev.queries, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                     show_progress_bar=show_progress_bar)
    c = model.encode(ev.catalogue_texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                     show_progress_bar=show_progress_bar)
    return {w: truncate(q, w) @ truncate(c, w).T for w in widths_for(q.shape[1])}


def _before(data: PointInTimeDataset, split: str) -> pa.Table:
    """The engagements of every window before ``split``: what a model scored on ``split`` may know."""
    return pa.concat_tables([data.splits[s] for s in SPLITS[: SPLITS.index(split)]])


def _fit_matrix(data: PointInTimeDataset, ev: EvalSet) -> tuple[csr_matrix, dict[str, int]]:
    """Users x catalogue engagement counts of every window before the scored one."""
    index = {x: i for i, x in enumerate(ev.catalogue_ids)}
    seen = _before(data, ev.split)
    pairs = [(u, index[i]) for u, i in zip(seen.column("user_id").to_pylist(), seen.column("item_id").to_pylist()) if i in index]
    users = {u: n for n, u in enumerate(dict.fromkeys(u for u, _ in pairs))}
    rows = np.array([users[u] for u, _ in pairs])
    cols = np.array([i for _, i in pairs])
    matrix = csr_matrix((np.ones(len(pairs), dtype=np.float32), (rows, cols)), shape=(len(users), len(index)))
    matrix.sum_duplicates()
    return matrix, users


def popularity_scores(data: PointInTimeDataset, ev: EvalSet) -> np.ndarray:
    """Every query gets the catalogue ranked by engagements before the scored window."""
    matrix, _ = _fit_matrix(data, ev)
    return np.tile(np.asarray(matrix.sum(axis=0)).ravel(), (len(ev.queries), 1))


def recent_popularity_scores(data: PointInTimeDataset, ev: EvalSet, days: int = 7) -> np.ndarray:
    """Every query gets the catalogue ranked by engagements in the ``days`` before the scored window starts:
    the trend a tower sees through its 7-day counters (the catalogue's counters are as of that start), so
    a tower must beat it with the same information."""
    start = data.meta[f"t_{ev.split}_ms"]
    seen = _before(data, ev.split)
    recent = seen.filter(pa.compute.greater_equal(seen.column("ts_ms"), start - days * 24 * 3600 * 1000))
    index = {x: i for i, x in enumerate(ev.catalogue_ids)}
    counts = np.zeros(len(index), dtype=np.float64)
    for item in recent.column("item_id").to_pylist():
        if item in index:
            counts[index[item]] += 1
    return np.tile(counts, (len(ev.queries), 1))


def _history_matrix(ev: EvalSet) -> csr_matrix:
    rows = np.concatenate([np.full(len(h), q) for q, h in enumerate(ev.history)] + [np.zeros(0, dtype=np.int64)])
    cols = np.concatenate(ev.history + [np.zeros(0, dtype=np.int64)])
    matrix = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(ev.queries), len(ev.catalogue_ids)))
    matrix.sum_duplicates()
    return matrix


def als_scores(data: PointInTimeDataset, ev: EvalSet, *, factors: int = 64, regularization: float = 0.05,
               alpha: float = 1.0, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """ALS (``implicit``) fitted on the engagements before the scored window; users are folded in from their
    positives before t, so users without earlier data still get a vector (items without any don't)."""
    from implicit.cpu.als import AlternatingLeastSquares

    matrix, _ = _fit_matrix(data, ev)
    model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                                    random_state=seed, num_threads=1)
    model.fit(matrix, show_progress=False)
    users = model.recalculate_user(np.arange(len(ev.queries)), _history_matrix(ev))
    return users @ model.item_factors.T


def tuned_als_scores(data: PointInTimeDataset, test: EvalSet, val: EvalSet, *, seed: int = 0) -> tuple[np.ndarray, dict]:
    """ALS with factors and regularization chosen on the validation window (fitted on train) by recall@10,
    then refitted on train + validation for the test window: a fair baseline."""
    grid = [dict(factors=f, regularization=r) for f in (32, 64, 128) for r in (0.01, 0.1, 1.0)]
    best = max(grid, key=lambda p: val.score_metrics(als_scores(data, val, seed=seed, **p))["overall"]["recall@10"])
    return als_scores(data, test, seed=seed, **best), best


class RecallEvaluator(SentenceEvaluator):
    """Validation recall@10 (and NDCG@10) at every Matryoshka width, for the trainer's curves."""

    def __init__(self, ev: EvalSet, *, name: str = "val", batch_size: int = 64) -> None:
        super().__init__()
        self.ev, self.name, self.batch_size = ev, name, batch_size
        self.primary_metric = "recall@10_full"

    def __call__(self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        scores = tower_scores(model, self.ev, batch_size=self.batch_size)
        full = max(scores)
        out: dict[str, float] = {}
        for w, s in scores.items():
            m = self.ev.score_metrics(s)["overall"]
            suffix = "full" if w == full else str(w)
            out[f"recall@10_{suffix}"] = m["recall@10"]
            out[f"ndcg@10_{suffix}"] = m[f"ndcg@{NDCG_K}"]
        metrics_out = self.prefix_name_to_metrics(out, self.name)
        self.store_metrics_in_model_card_data(model, metrics_out, epoch, steps)
        return metrics_out


# ---------------------------------------------------------------- report


@dataclass
class Row:
    method: str
    width: int | None  # None for baselines without embeddings of a width
    results: dict[str, dict[str, float]]  # slice -> metric -> value
    intervals: dict[str, dict[str, tuple[float, float]]]  # slice -> recall@k -> 95% bootstrap interval
    rank: np.ndarray  # every query's target rank, for paired comparisons on the same queries
    tuned: bool = False  # a trained tower (compared with the references) rather than a baseline


@dataclass
class Comparison:
    """A tuned tower against a reference on the same queries of one slice."""

    method: str
    reference: str
    slice: str
    k: int
    difference: float
    interval: tuple[float, float]  # 95% paired bootstrap


def make_row(ev: EvalSet, method: str, width: int | None, scores: np.ndarray, *, tuned: bool = False) -> Row:
    rank = ev.ranks(scores)
    results = {name: metrics(rank[mask]) for name, mask in ev.slices.items()}
    intervals = {name: {f"recall@{k}": recall_interval(rank[mask], k) for k in KS} for name, mask in ev.slices.items()}
    return Row(method, width, results, intervals, rank, tuned)


def evaluate_methods(ev: EvalSet, methods: dict[str, Callable[[], dict[int | None, np.ndarray]]],
                     tuned: Iterable[str] = ()) -> list[Row]:
    """Rows for every method at every width it offers; ``tuned`` names the trained towers."""
    rows, tuned = [], set(tuned)
    for name, scorer in methods.items():
        log.info("evaluating %s", name)
        for width, scores in scorer().items():
            rows.append(make_row(ev, name, width, scores, tuned=name in tuned))
    return rows


def _full_width(rows: list[Row], method: str) -> Row | None:
    mine = [r for r in rows if r.method == method]
    return max(mine, key=lambda r: r.width or 0) if mine else None


def comparisons(rows: list[Row], ev: EvalSet, references: Iterable[str]) -> list[Comparison]:
    """Each tuned tower (full width) minus each reference (a tower at its full width) on every slice and k."""
    out = []
    for method in dict.fromkeys(r.method for r in rows if r.tuned):
        row = _full_width(rows, method)
        for reference in filter(None, (_full_width(rows, name) for name in references)):
            for name, mask in ev.slices.items():
                for k in KS:
                    diff = row.results[name][f"recall@{k}"] - reference.results[name][f"recall@{k}"]
                    out.append(Comparison(method, reference.method, name, k, diff,
                                          difference_interval(row.rank[mask], reference.rank[mask], k)))
    return out


def _cell(value: float, interval: tuple[float, float] | None = None) -> str:
    if np.isnan(value):
        return "—"
    return f"{value:.4f}" if interval is None else f"{value:.4f} ({interval[0]:.3f}–{interval[1]:.3f})"


def markdown(rows: list[Row], ev: EvalSet, compared: list[Comparison] = ()) -> str:
    """One table per slice: method, width, recall@10/50/100 with 95% intervals, NDCG@10; then the paired differences."""
    cols = [f"recall@{k}" for k in KS] + [f"ndcg@{NDCG_K}"]
    parts = [f"Recall cells: value (95% bootstrap interval over the queries, {RESAMPLES} resamples).\n"]
    for name in SLICES:
        n = int(ev.slices[name].sum())
        parts.append(f"### {name} (n={n} queries)\n")
        parts.append("| method | width | " + " | ".join(cols) + " |")
        parts.append("|---|---:|" + "---:|" * len(cols))
        for row in rows:
            values = " | ".join(_cell(row.results[name][c], row.intervals[name].get(c)) for c in cols)
            parts.append(f"| {row.method} | {row.width or '—'} | {values} |")
        parts.append("")
    if compared:
        parts.append("### tuned towers against references, same queries (paired bootstrap)\n")
        parts.append("| slice | tower | reference | k | recall difference | 95% interval |")
        parts.append("|---|---|---|---:|---:|---|")
        for c in compared:
            parts.append(f"| {c.slice} | {c.method} | {c.reference} | {c.k} | {c.difference:+.4f} | "
                         f"{c.interval[0]:+.3f} to {c.interval[1]:+.3f} |")
        parts.append("")
    return "\n".join(parts)


def plot_recall_by_width(rows: list[Row], path: Path, metric: str = "recall@10") -> None:
    """Recall by Matryoshka width per tower (lines), baselines as horizontal lines, one panel per slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SLICES), figsize=(5 * len(SLICES), 4), sharey=False)
    for ax, name in zip(axes, SLICES):
        towers = sorted({r.method for r in rows if r.width is not None}, key=[r.method for r in rows].index)
        for method in towers:
            pts = sorted((r.width, r.results[name][metric]) for r in rows if r.method == method and r.width is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        baselines = [r for r in rows if r.width is None]
        for n, r in enumerate(baselines):
            ax.axhline(r.results[name][metric], linestyle="--", linewidth=1.2, label=r.method, color=f"C{len(towers) + n}")
        widths = sorted({r.width for r in rows if r.width is not None})
        if widths:
            ax.set_xticks(widths)
        ax.set_xlabel("embedding width")
        ax.set_title(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- a whole evaluation run


def load_trained(directory: Path) -> SentenceTransformer:
    """A trained tower from a training output directory (its ``model``), one of its checkpoints, or a
    shipped tuned tower (adapter + head, ``models/tuned.py``)."""
    from models.tuned import TUNED_FILE, load_tuned

    if (directory / TUNED_FILE).is_file():
        return load_tuned(directory)
    path = directory / "model" if (directory / "model" / "modules.json").is_file() else directory
    if not (path / "modules.json").is_file():
        raise ValueError(f"{directory} holds no trained tower (no model/ or modules.json)")
    model = SentenceTransformer(str(path), device="cpu")
    model.eval()
    return model


def run_config(directory: Path):
    """The training config of a training output directory or of a shipped tuned tower (which records it)."""
    from models.tuned import TUNED_FILE, read_tuned
    from training.config import TrainConfig, read_run

    if (directory / TUNED_FILE).is_file():
        recorded = read_tuned(directory).training
        return TrainConfig.model_validate({k: v for k, v in recorded.items() if k in TrainConfig.model_fields})
    return read_run(directory)[0]


def run_evaluation(settings, config, models: dict[str, Path], out_dir: Path, *, max_queries: int | None,
                   baselines: bool = True, split: str = "test", only: str | None = None) -> tuple[str, list[Row]]:
    """The evaluation table (markdown, also written to ``out_dir``) and the recall-by-width plot; ``only``
    scores the queries of one slice."""
    from models.tower import build_tower
    from training.dataset import load_or_build

    data = load_or_build(settings, config.dataset_options())
    ev = EvalSet.from_dataset(data, split, max_queries=max_queries, seed=config.seed, only=only)
    methods: dict[str, Callable[[], dict[int | None, np.ndarray]]] = {}
    notes: list[str] = []
    untuned = f"untuned {config.base_model} tower"
    if baselines:
        methods["popularity"] = lambda: {None: popularity_scores(data, ev)}
        methods["popularity, last 7 days"] = lambda: {None: recent_popularity_scores(data, ev)}

        def als() -> dict[int | None, np.ndarray]:
            val = EvalSet.from_dataset(data, "val", max_queries=max_queries, seed=config.seed)
            scores, best = tuned_als_scores(data, ev, val, seed=config.seed)
            notes.append(f"ALS: factors={best['factors']}, regularization={best['regularization']} (chosen on validation recall@10)")
            return {None: scores}

        methods["ALS (implicit)"] = als
        methods[untuned] = lambda: tower_scores(
            build_tower(config.base_model, dim=config.dim, max_seq_length=config.max_seq_length, pooling=config.pooling,
                        cache_dir=settings.cache_dir), ev)
    for label, directory in models.items():
        trained = run_config(directory)
        variant = EvalSet.from_dataset(load_or_build(settings, trained.dataset_options()), split, max_queries=max_queries,
                                       seed=config.seed, only=only)
        if variant.key != ev.key or variant.catalogue_ids != ev.catalogue_ids:
            raise ValueError(f"model {label!r} was trained on other events or another split than {config.output_dir}'s config")
        methods[label] = lambda directory=directory, variant=variant: tower_scores(load_trained(directory), variant)
    rows = evaluate_methods(ev, methods, tuned=models)
    compared = comparisons(rows, ev, ["ALS (implicit)", untuned])
    table = markdown(rows, ev, compared) + "".join(f"\n{n}" for n in notes) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.md").write_text(table)
    (out_dir / "evaluation.json").write_text(json.dumps(
        {"split": split, "only": only, "queries": len(ev.queries), "slices": {n: int(m.sum()) for n, m in ev.slices.items()}, "notes": notes,
         "rows": [{"method": r.method, "width": r.width, "results": r.results, "intervals95": r.intervals} for r in rows],
         "paired": [vars(c) for c in compared]}, indent=1))
    plot_recall_by_width(rows, out_dir / "recall_by_width.png")
    return table, rows
