"""Stages: the evaluation gate, and registration of a clean backbone that passed it."""

from __future__ import annotations

import mlflow
from prefect import get_run_logger, task

from secvec.gate import Thresholds, decide
from secvec.registry import CANDIDATE, CHAMPION, ChampionPolicy, maybe_promote, register_clean_model
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
    """Register the clean backbone as a new version (alias candidate); move champion if it wins."""
    client = mlflow.MlflowClient()
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    version = existing[0].version if existing else register_clean_model(
        client, run_id, model_dir, name, tags, expected_sha256)  # a retry must not register twice
    promoted = maybe_promote(client, name, version, metrics, ChampionPolicy(**policy))
    aliases = [CANDIDATE] + ([CHAMPION] if promoted else [])
    get_run_logger().info("registered %s version %s (%s)", name, version, ", ".join(aliases))
    return {"name": name, "version": str(version), "aliases": aliases}
