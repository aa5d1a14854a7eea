"""Stages: the evaluation gate, and registration of a clean backbone that passed it."""

from __future__ import annotations

import mlflow
from prefect import get_run_logger, task

from secvec.gate import Thresholds, decide
from secvec.registry import (
    CANDIDATE,
    CHAMPION,
    ChampionPolicy,
    find_version,
    maybe_promote,
    register_clean_model,
)
from tasks.common import RETRIES


@task(name="gate")
def gate(base: dict | None, clean: dict, strip_check: dict, coverage: dict | None, thresholds: dict) -> dict:
    """Pure decision: passed, reasons, per-check values and limits."""
    decision = decide(base, clean, strip_check, coverage, Thresholds(**thresholds))
    log = get_run_logger()
    log.info("gate %s", "PASSED" if decision.passed else "FAILED")
    for reason in decision.reasons:
        log.warning("gate: %s", reason)
    return decision.model_dump()


@task(name="register-clean-backbone", **RETRIES)
def register(run_id: str, model_dir: str, name: str, tags: dict, expected_sha256: dict[str, str],
             metrics: dict, policy: dict) -> dict:
    """Register the clean backbone as a new version (alias candidate); move champion if it wins.

    Idempotent: weights already registered under `name` (a re-run with unchanged inputs, a retry) reuse
    their version instead of adding a duplicate.
    """
    client = mlflow.MlflowClient()
    version = find_version(client, name, expected_sha256)
    if version is None:
        version = register_clean_model(client, run_id, model_dir, name, tags, expected_sha256)
    else:
        get_run_logger().info("these weights are already %s version %s", name, version)
        client.set_registered_model_alias(name, CANDIDATE, version)
    promoted = maybe_promote(client, name, version, metrics, ChampionPolicy(**policy))
    aliases = [CANDIDATE] + ([CHAMPION] if promoted else [])
    get_run_logger().info("registered %s version %s (%s)", name, version, ", ".join(aliases))
    return {"name": name, "version": str(version), "aliases": aliases}
