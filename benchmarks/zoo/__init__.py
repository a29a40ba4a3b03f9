"""The pathology corpus: families of small, seeded training runs, each with a planted cause
(or none), run under ``gradscope.watch`` to score the diagnosis rules.

- :mod:`.families`: the families, their variants and labels.
- :mod:`.outcome`: confirmation by outcome (plain PyTorch, no gradscope).
- :mod:`.run`: the runner (``python -m benchmarks.zoo.run``), re-diagnosis and cure runs.
- :mod:`.score`: precision/recall per kind, layer accuracy, delays, confusion, cure rates.
"""
