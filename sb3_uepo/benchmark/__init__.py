"""``uepo bench``: UEPO against the Uni-O4 preset and SB3 baselines under one online env-step budget.

Modules: ``baselines`` (how each algorithm is built), ``runner`` (one process per run, resumable), ``stats``
(IQM, bootstrap intervals), ``report`` (results JSON, markdown table, learning-curve plots).
Importing this package is light; SB3 and torch are imported by the functions that run things.
"""
