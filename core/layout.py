"""The store root's layout, named once. Sweeps, evaluation, history and reports all use it.

    <root>/models/<name>-<recipe hash>/      merged checkpoints + chatvec manifest
    <root>/vectors/<name>/                   chat vectors written by `chatvec extract` (by convention)
    <root>/results/run=<run_id>/             one evaluation run: samples per cell, summary, sweep.json
    <root>/reports/<run_id>/index.html       the report and its plots

Shared infrastructure (no Ray, no evaluation): eval/ may import it.
"""

from __future__ import annotations

from chatvec.core.storage import join

MODELS = "models"
VECTORS = "vectors"
RESULTS = "results"
REPORTS = "reports"
RUN_PREFIX = "run="  # results are hive-partitioned by run
# in every merged model's folder, written last: the commit point, with the recipe's fingerprint
MANIFEST = "chatvec_manifest.json"


def model_uri(root: str, folder: str) -> str:
    """Where a merged model named ``folder`` (``<name>-<recipe hash>``) lives."""
    return join(root, MODELS, folder)


def results_uri(root: str) -> str:
    """The runs dataset: every run's results."""
    return join(root, RESULTS)


def run_results_uri(root: str, run_id: str) -> str:
    """One run's results: ``<root>/results/run=<run_id>``."""
    return join(root, RESULTS, f"{RUN_PREFIX}{run_id}")


def report_uri(root: str, run_id: str) -> str:
    """The folder of one run's report (``index.html`` inside)."""
    return join(root, REPORTS, run_id)
