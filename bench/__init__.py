"""Benchmarks for the pipeline: ``python -m bench.run`` (or ``make bench``) writes ``bench/results/<name>.json``.

Modules, one per benchmark: :mod:`bench.stage_one` (teacher scoring throughput), :mod:`bench.stage_two`
(KD-from-cache vs CE-only step cost), :mod:`bench.online_gkd` (TRL GKDTrainer with the teacher in the loop),
:mod:`bench.cache_size` (bytes by K, kept mass), :mod:`bench.loader` (loader headroom). :mod:`bench.records`
holds what every result file shares (machine, versions, timing statistics); :mod:`bench.run` is the entry.
"""
