"""Model registry: a pure champion policy, and MLflow calls through an explicit `MlflowClient`.

Nothing here touches MLflow's global (fluent) state: every function takes the client, whose tracking URI
the caller chose. A registered version is an MLflow 3 model of the transformers flavor (`secvec.mlflow_model`:
loadable with `mlflow.transformers` / `mlflow.pyfunc`, servable with `mlflow models serve`), logged by its run
as a `LoggedModel`. It carries the sha256 of its weight files as a tag; registration refuses weights that
differ from the ones that were evaluated, and `verify` re-checks a version's files.
Finding-or-creating a version and alias moves hold the model's registry lock (`secvec.registry_lock`: a
PostgreSQL advisory lock for a team's shared registry, a file lock on one machine), so concurrent runs
register the same weights once and leave aliases consistent.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from secvec.config import ChampionPolicy
from secvec.mlflow_model import build_chat_model, card_text, weights_dir
from secvec.models import sha256_file
from secvec.registry_lock import registry_lock

log = logging.getLogger(__name__)

ARTIFACT_PATH = "clean_model"
CANDIDATE, CHAMPION = "candidate", "champion"
TAG_WEIGHTS, TAG_METRICS, TAG_DECISION = "weights_sha256", "metrics", "champion_decision"


class WeightsMismatchError(RuntimeError):
    """The weight files about to be registered are not the ones that were evaluated."""


def beats(new: dict, champion: dict | None, policy: ChampionPolicy) -> tuple[bool, str]:
    """Whether metrics `new` should replace the champion's metrics, and why (pure)."""
    if champion is None:
        return True, "no champion yet"
    key = policy.metric
    if new.get(key) is None:
        return False, f"candidate has no {key}"
    if champion.get(key) is None:
        return False, f"champion has no recorded {key}; promote by hand"
    if policy.harmful_metric:
        harm, champ_harm = new.get(policy.harmful_metric), champion.get(policy.harmful_metric)
        if harm is None or champ_harm is None:
            return False, f"{policy.harmful_metric} missing for candidate or champion; promote by hand"
        if harm > champ_harm + policy.harmful_tolerance:
            return False, (f"{policy.harmful_metric} {harm:.3f} > champion {champ_harm:.3f} "
                           f"+ tolerance {policy.harmful_tolerance:.3f}")
    gain = (new[key] - champion[key]) * (1 if policy.higher_is_better else -1)
    if gain > policy.min_improvement:
        return True, f"{key} {new[key]:.3f} beats champion {champion[key]:.3f}"
    return False, (f"{key} {new[key]:.3f} does not beat champion {champion[key]:.3f} "
                   f"by more than {policy.min_improvement}")


def _hashes(model_dir: Path) -> dict[str, str]:
    files = sorted(model_dir.rglob("*.safetensors"))
    return {p.relative_to(model_dir).as_posix(): sha256_file(p) for p in files}


def weights_sha256(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every *.safetensors file under a model directory, keyed by relative path."""
    hashes = _hashes(Path(model_dir))
    if not hashes:
        raise ValueError(f"{model_dir}: no *.safetensors weight files to hash")
    return hashes


def _tag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _alias_lock(client, name: str):
    # The registry store's URI: the lock lives there when it is PostgreSQL (client.tracking_uri otherwise)
    return registry_lock(getattr(client, "_registry_uri", None) or client.tracking_uri, name)


def _require_hashes(actual: dict[str, str], expected: dict[str, str], where: str) -> None:
    if not expected or actual != expected:
        changed = sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))
        raise WeightsMismatchError(f"{where}: weight files differ from the evaluated ones: {changed}")


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def find_version(client, name: str, weights: dict[str, str]) -> str | None:
    """The registered version of `name` whose weight files have exactly these sha256s, if any."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if json.loads(mv.tags.get(TAG_WEIGHTS) or "{}") == weights:
            return str(mv.version)
    return None


def run_datasets(client, run_id: str) -> list[dict[str, str]]:
    """The dataset inputs of a run (one per data role: name, digest, context), to link to its model."""
    datasets = []
    for entry in client.get_run(run_id).inputs.dataset_inputs:
        context = next((t.value for t in entry.tags if t.key == "mlflow.data.context"), None)
        datasets.append({"name": entry.dataset.name, "digest": entry.dataset.digest, "context": context})
    return datasets


def _earlier_upload(client, experiment_id: str, run_id: str, expected_sha256: dict[str, str]):
    """A READY logged model of this run with these weights: an attempt that failed after uploading."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{ARTIFACT_PATH}'")
    # READY is checked here: MLflow 3.17's `status = 'READY'` filter fails on PostgreSQL (an integer column)
    return next((m for m in found if m.status == "READY"
                 and json.loads(m.tags.get(TAG_WEIGHTS) or "{}") == expected_sha256), None)


def log_clean_model(client, run_id: str, model_dir: str | Path, name: str, tags: dict[str, Any],
                    expected_sha256: dict[str, str]):
    """Log the clean backbone as the run's MLflow 3 model (a `LoggedModel` of the transformers flavor).

    `model_dir` is copied and the copy's weights are compared with `expected_sha256` before anything is
    created in MLflow; that copy becomes the model's `model/` folder (`secvec.mlflow_model`), so the uploaded
    bytes are the checked bytes. A READY model of this run with these weights (a retried task) is downloaded,
    re-hashed and reused, never overwritten: a registered version may point at it.

    Returns:
        The READY `mlflow.entities.LoggedModel`.

    Raises:
        WeightsMismatchError: the copy, or the earlier upload, differs from `expected_sha256`.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="secvec-register-") as tmp:
        earlier = _earlier_upload(client, experiment_id, run_id, expected_sha256)
        if earlier is not None:
            local = _download(client, earlier.artifact_location, tmp)
            _require_hashes(_hashes(weights_dir(local)), expected_sha256,
                            f"run {run_id} logged model {earlier.model_id}")
            log.info("registry: reusing the upload %s of run %s", earlier.model_id, run_id)
            return earlier
        # Named after the model: MLflow reports this (absolute, never a Hub id) path as the model of each reply
        staged = Path(tmp) / re.sub(r"[^A-Za-z0-9._-]", "_", name)
        shutil.copytree(model_dir, staged)
        _require_hashes(_hashes(staged), expected_sha256, str(model_dir))
        # Logged-model tags are capped at 8,000 characters; the version carries every tag in full.
        short = {k: t for k, v in tags.items() if len(t := _tag_value(v)) <= 8000}
        short[TAG_WEIGHTS] = _tag_value(expected_sha256)
        logged = client.create_logged_model(experiment_id, name=ARTIFACT_PATH, source_run_id=run_id,
                                            tags=short, model_type="chat")
        try:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                         model_id=logged.model_id)
            local = build_chat_model(staged, Path(tmp) / ARTIFACT_PATH, card_text(name, tags, expected_sha256), meta)
            client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)  # never reused
            raise
        return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def register_clean_model(client, run_id: str, model_dir: str | Path, name: str, tags: dict[str, Any],
                         expected_sha256: dict[str, str]) -> str:
    """Log the clean model as an MLflow model (`log_clean_model`) and register it as a new version aliased
    `candidate`, linked to that logged model, the run's dataset inputs and the tags.

    Args:
        client: an `mlflow.MlflowClient` bound to the tracking/registry URI to use.
        run_id: the run that produced the model; its logged model is named `clean_model`.
        tags: version tags (dataset md5, vector hash, base hash, git sha, metrics, thresholds, gate...);
            values that are not strings are stored as JSON. The `metrics` tag is what `maybe_promote`
            compares. The run's dataset inputs are added as `datasets`.
        expected_sha256: file -> sha256 from `weights_sha256` at evaluation time.

    Returns:
        The new version number (a string).

    Raises:
        WeightsMismatchError: the weights differ from `expected_sha256` (nothing is registered).
        ValueError: this run already registered a version of `name`.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        raise ValueError(f"run {run_id} already registered {name} version {existing[0].version}")
    datasets = run_datasets(client, run_id)
    tags = ({"datasets": datasets} if datasets else {}) | tags
    version_tags = {k: _tag_value(v) for k, v in tags.items()} | {TAG_WEIGHTS: _tag_value(expected_sha256)}
    logged = log_clean_model(client, run_id, model_dir, name, version_tags, expected_sha256)
    # The source is the logged model's artifact folder, not `models:/<model_id>`: a sqlite or PostgreSQL
    # registry resolves that URI through MLflow's global client, which may point at another store.
    source = logged.artifact_location
    with _alias_lock(client, name):
        _ensure_registered_model(client, name)
        created = client.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                              model_id=logged.model_id)
        version = str(created.version)
        client.set_registered_model_alias(name, CANDIDATE, version)
    # What MLflow's own registration records on the logged model (the version as MLflow's entity has it):
    # the UI links the logged model to its versions through it.
    links = json.loads(client.get_logged_model(logged.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        links + [{"name": name, "version": created.version}])})
    log.info("registry: %s version %s registered from run %s (alias %s)", name, version, run_id, CANDIDATE)
    return version


def maybe_promote(client, name: str, version: str, metrics: dict, policy: ChampionPolicy) -> bool:
    """Move alias `champion` to `version` if its metrics beat the champion's `metrics` tag (or none exists).

    The decision's reason is written to the version's `champion_decision` tag.
    """
    version = str(version)
    with _alias_lock(client, name):
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        if current is not None and str(current) == version:
            return True
        champion = None
        if current is not None:
            champion = json.loads(client.get_model_version(name, str(current)).tags.get(TAG_METRICS, "{}"))
        promoted, reason = beats(metrics, champion, policy)
        client.set_model_version_tag(name, version, TAG_DECISION, reason)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info("registry: %s version %s %s champion: %s", name, version, "is" if promoted else "is not", reason)
    return promoted


def version_tags(dataset_md5: str, vector_sha256: str, base_sha256: str, git_sha: str, thresholds: dict,
                 metrics: dict, gate: dict | None = None) -> dict[str, Any]:
    """The lineage a registered version carries; `metrics` is what the next champion is compared with, and
    `gate` the decision that let it in (passed, reasons, one entry per check)."""
    tags = {"dataset_md5": dataset_md5, "vector_sha256": vector_sha256, "base_model_sha256": base_sha256,
            "git_sha": git_sha, "thresholds": thresholds,
            "metrics": {k: metrics[k] for k in ("harmful_rate", "over_refusal_rate", "utility", "perplexity")}}
    return tags | ({"gate": gate} if gate is not None else {})


def register_once(client, run_id: str, model_dir: str | Path, name: str, tags: dict[str, Any],
                  expected_sha256: dict[str, str], metrics: dict, policy: ChampionPolicy) -> dict:
    """Register the clean backbone as a new version (alias candidate) and move champion if it wins.

    Idempotent: weights already registered under `name` (a re-run with unchanged inputs, a retry) reuse
    their version instead of adding a duplicate.

    Returns:
        {"name", "version", "aliases"}.
    """
    with _alias_lock(client, name):  # find-or-create as one step: runs with the same weights make one version
        version = find_version(client, name, expected_sha256)
        if version is None:
            version = register_clean_model(client, run_id, model_dir, name, tags, expected_sha256)
        else:
            log.info("registry: these weights are already %s version %s", name, version)
            client.set_registered_model_alias(name, CANDIDATE, version)
    promoted = maybe_promote(client, name, version, metrics, policy)
    return {"name": name, "version": str(version), "aliases": [CANDIDATE] + ([CHAMPION] if promoted else [])}


def promote(client, name: str, version: str) -> None:
    """Make `version` the champion by hand (it must exist)."""
    version = str(version)
    client.get_model_version(name, version)
    with _alias_lock(client, name):
        client.set_model_version_tag(name, version, TAG_DECISION, "promoted by hand")
        client.set_registered_model_alias(name, CHAMPION, version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/NAME@ALIAS' -> (NAME, ALIAS, None); 'models:/NAME/VERSION' -> (NAME, None, VERSION)."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not match:
        raise ValueError(f"{uri!r}: expected 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'")
    return match.group(1), match.group(2), match.group(3)


def _download(client, source: str, dst: str) -> Path:
    import mlflow.artifacts

    if source.startswith("runs:/"):
        run_id, _, path = source.removeprefix("runs:/").partition("/")
        return Path(client.download_artifacts(run_id, path, dst))
    # tracking_uri is passed explicitly: without it MLflow would fall back to its global default store
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst,
                                                    tracking_uri=client.tracking_uri))


def verify(client, model: str, version: str | None = None, dst_path: str | Path | None = None) -> dict:
    """Download a model version's files and compare their sha256 with the version's `weights_sha256` tag.

    Args:
        model: 'models:/NAME@ALIAS', 'models:/NAME/VERSION', or a bare NAME together with `version`.
        dst_path: keep the downloaded files there (e.g. to load the verified model); a temp dir otherwise.

    Returns:
        {"name", "version", "source", "ok", "mismatched", "missing", "extra", "path"}.
    """
    if model.startswith("models:/"):
        name, alias, version = parse_model_uri(model)
        if alias:
            version = str(client.get_model_version_by_alias(name, alias).version)
    elif version is None:
        raise ValueError("verify needs 'models:/NAME@ALIAS', 'models:/NAME/VERSION', or NAME and version")
    else:
        name = model
    mv = client.get_model_version(name, str(version))
    expected = json.loads(mv.tags.get(TAG_WEIGHTS) or "{}")
    source = client.get_model_version_download_uri(name, str(version))
    with tempfile.TemporaryDirectory(prefix="secvec-verify-") as tmp:
        local = _download(client, source, str(dst_path or tmp))
        actual = _hashes(weights_dir(local))
    result = {
        "name": name,
        "version": str(version),
        "source": source,
        "mismatched": sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k]),
        "missing": sorted(expected.keys() - actual.keys()),
        "extra": sorted(actual.keys() - expected.keys()),
        "path": str(local) if dst_path else None,
    }
    result["ok"] = bool(expected) and not (result["mismatched"] or result["missing"] or result["extra"])
    log.info("registry: verify %s version %s: %s", name, version, "ok" if result["ok"] else result)
    return result
