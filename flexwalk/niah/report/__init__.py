"""Comparison reports over NIAH runs: `flexwalk niah compare RUN [RUN ...] --out DIR`.

A result path is either a flexwalk run directory (run.json + samples.jsonl, plain or .gz [+ summary.json])
or a RULER prediction root (`<model>/<benchmark>/<length>/pred/<task>.jsonl`, any level of it),
scored here with RULER's own rule per task (`load`).  `compare.compare` aggregates them
(`summary`) and writes report.md (`markdown`), report.json and PNG plots (`plots`); see
docs/niah-report.md.
"""
