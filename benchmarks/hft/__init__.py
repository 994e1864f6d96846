"""The harmful-fine-tuning protocol: which defense keeps a fine-tuned model safe, on one protocol, with intervals.

Run as ``python -m benchmarks.hft`` from the repository root (see ``benchmarks/README.md``). Modules: `config`
(settings and presets), `data` (row sets, the fine-tuning mix, the disjointness check), `arms` (the registry of
defenses), `evaluate` (generation, judges, style markers, task accuracy), `runner` (the grid and per-run files),
`stats` (seed-level intervals), `combine` (pooling the runs into ``hft.json``), `report` (``docs/leaderboard.md`` and
its figure).
"""
