"""Encoder benchmark (issue 3) as a script; the same run as ``onetower model bench`` (see models/bench.py).

    python benchmarks/bench_encoder.py --out bench-out [--quick] [--base minilm] [--threads N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.settings import Settings
from models.bench import run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="torch vs ONNX fp32 vs int8 encoder speed on MovieLens-like texts")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true", help="MiniLM only, batch 1 and 32, short cells")
    parser.add_argument("--base", action="append", help="limit to these base models (repeatable)")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and onnxruntime")
    args = parser.parse_args()
    run(args.out, Settings(), quick=args.quick, bases=args.base, threads=args.threads)
