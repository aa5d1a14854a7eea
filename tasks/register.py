"""Stages: the evaluation gate, and registration of a clean backbone that passed it."""

from __future__ import annotations

import mlflow
from prefect import get_run_logger, task

from secvec.config import ChampionPolicy, Thresholds
from secvec.gate import Decision, decide
from secvec.refs import ModelRef
from secvec.registry import register_once
from tasks.common import RETRIES


@task(name="gate")
def gate(base: dict | None, clean: dict, strip_check: dict, coverage: dict | None, thresholds: Thresholds) -> Decision:
    """Pure decision: passed, reasons, per-check values and limits."""
    decision = decide(base, clean, strip_check, coverage, thresholds)
    log = get_run_logger()
    log.info("gate %s", "PASSED" if decision.passed else "FAILED")
    for reason in decision.reasons:
        log.warning("gate: %s", reason)
    return decision


@task(name="register-clean-backbone", **RETRIES)
def register(run_id: str, model: ModelRef, name: str, tags: dict, expected_sha256: dict[str, str],
             metrics: dict, policy: ChampionPolicy) -> dict:
    """Register the clean backbone (idempotent: the same weights keep their version); champion if it wins."""
    registered = register_once(mlflow.MlflowClient(), run_id, model.dir, name, tags, expected_sha256, metrics,
                               policy)
    get_run_logger().info("registered %s version %s (%s)", name, registered["version"],
                          ", ".join(registered["aliases"]))
    return registered
