"""The HTML report of a run directory (``report.html``; ``gradscope report RUN``).

Imported on demand: it needs numpy, pyarrow (to read the run back), Pillow (the heatmaps' PNGs)
and Jinja2, none of which ``import gradscope`` loads.
"""

from __future__ import annotations

from .compare import write_compare
from .html import REPORT, write_report

__all__ = ["REPORT", "write_compare", "write_report"]
