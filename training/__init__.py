"""Offline training of the shared tower from the same Kafka topics the stream workers consume.

- ``training.dataset``: point-in-time examples (user as of t, positive with counters as of t, hard
  negatives shown-not-engaged nearest to t), time split, parquet cache keyed by a fingerprint.
- ``training.train``: sentence-transformers trainer, Matryoshka(logQ-corrected InfoNCE with in-batch + hard
  negatives, ``training.losses``), NO_DUPLICATES batches, LoRA / cached-loss / bf16 / gradient-checkpointing options.
- ``training.evaluate``: recall@10/50/100 and NDCG@10 over the catalogue, cold slices, every width,
  against popularity, ALS and the untuned tower.

Commands (``onetower.training_cli``): ``onetower train --config training/configs/movielens-minilm.yaml [flags]``,
``onetower evaluate --config ... --model LABEL=RUN_DIR``, ``onetower export RUN_DIR --out DIR``.
Several GPUs: ``torchrun --nproc_per_node 8 $(which onetower) train --config ...`` (rank 0 builds
the dataset, the others read its cache; in-batch negatives are gathered across devices).
"""
