"""Ablation grids of SSVP: YAML grids of variants x seeds (``ablations.spec``), the launcher
(``ablations/grid.py``, on ``tuning.runner``) and the aggregation into the paper's tables,
paired comparisons and plots (``ablations.aggregate``)."""
