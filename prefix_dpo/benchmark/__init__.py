"""Benchmark: prefix sharing vs paired DPO, side by side with the paper.

``python -m prefix_dpo.benchmark --config configs/bench/capybara.py --out DIR``
(``configs/bench/all.py``: all six workloads). For each workload it lays out
the same examples per step in four modes -- ``paired``, ``paired_packed``,
``prefix_shared``, ``prefix_shared_packed`` -- times the trainer's full DPO
step on each (interleaved, medians), and compares the achieved speedup with
the ideal one (the FLOP ratio, attention counted by the mask) and with the
paper's. Writes ``results.json``, ``table.md`` and ``chart.png`` to DIR.

Modules: :mod:`.workloads` (examples), :mod:`.plan` (static shapes and
batches per mode), :mod:`.timing` (compile and time the step),
:mod:`.report` (numbers, table, chart), :mod:`.run` (the whole run).
"""
