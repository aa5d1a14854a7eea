"""The worst-case attacker: its search space and bookkeeping, then `secvec attack --config quick` for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from secvec.attack import (
    CONSTRAINT,
    AttackParams,
    attack_finetune,
    completed,
    open_study,
    reference_params,
    settled,
    stop_when_settled,
    study_name,
    suggest,
    worst_case,
)
from secvec.config import AttackSpace, FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_plain_arm_never_draws_a_task_lora_and_the_draw_shapes_the_fine_tuning():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    draws = [suggest(study.ask(), AttackSpace(), "plain") for _ in range(20)]
    assert {d.mode for d in draws} == {"full"} and len({d.optimizer for d in draws}) == 2
    params = AttackParams(lr_scale=10.0, epochs=2, optimizer="sgd", mode="lora", scheduler="cosine", harmful=100)
    cfg = attack_finetune(FinetuneConfig(), params, epochs_scale=0.5, lora_learning_rate=1e-3)
    assert cfg.mode == "lora" and cfg.train.learning_rate == pytest.approx(1e-2) and cfg.train.epochs == 1.0
    assert (cfg.train.optimizer, cfg.train.scheduler) == ("sgd", "cosine")
    # SGD's x1 is a multiple of AdamW's (AttackSpace.sgd_lr_factor): at AdamW's rate it learns nothing
    adamw = attack_finetune(FinetuneConfig(), params.model_copy(update={"optimizer": "adamw", "mode": "full"}),
                            sgd_lr_factor=100.0)
    sgd = attack_finetune(FinetuneConfig(), params.model_copy(update={"mode": "full"}), sgd_lr_factor=100.0)
    assert sgd.train.learning_rate == pytest.approx(100 * adamw.train.learning_rate)


def test_each_arm_first_tries_the_pipelines_own_fine_tuning_where_the_space_can_express_it(tmp_path):
    base = FinetuneConfig()  # 3 epochs at lr 3e-4, AdamW, linear
    ref = reference_params(base, AttackSpace(), epochs_scale=1.0)
    assert ref == AttackParams(lr_scale=1.0, epochs=3, optimizer="adamw", mode="full", scheduler="linear",
                               harmful=1000)
    # with these draws the attack's fine-tuning is the pipeline's, so its stages are the floor's own
    assert attack_finetune(base, ref) == base.model_copy(update={"mode": "full"})
    assert reference_params(base, AttackSpace(), epochs_scale=2.0) is None  # 1.5 sampled epochs
    assert reference_params(base, AttackSpace(lr_scale=(2.0, 30.0)), epochs_scale=1.0) is None
    study = open_study(tmp_path / "study.db", "s", seed=0)
    for _ in range(2):  # a resumed search does not queue it again
        study.enqueue_trial(ref.model_dump(), skip_if_exists=True)
    first = study.ask()
    assert suggest(first, AttackSpace(), "plain") == ref
    study.tell(first, 0.5)
    assert suggest(study.ask(), AttackSpace(), "plain") != ref


def test_the_worst_case_counts_only_attacks_above_the_utility_floor(tmp_path):
    study = open_study(tmp_path / "study.db", "s", seed=0)

    def objective(trial):
        harm = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("utility", 1 - harm)
        trial.set_constraint(CONSTRAINT, 0.5 - (1 - harm))  # harm above 0.5 costs the task
        return harm

    study.optimize(objective, n_trials=8)
    result = worst_case(open_study(tmp_path / "study.db", "s", seed=0))  # reopened: the same trials
    assert result["trials"] == len(completed(study)) == 8
    feasible = [h["harmful_rate"] for h in result["history"] if h["harmful_rate"] <= 0.5]
    assert result["feasible"] == len(feasible) and result["worst"]["harmful_rate"] == max(feasible)


def test_an_arm_stops_searching_once_a_feasible_attack_is_fully_harmful(tmp_path):
    study = open_study(tmp_path / "study.db", "s", seed=0)
    harm = iter([0.4, 1.0, 1.0, 0.9, 1.0, 1.0])
    utility = iter([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the first 1.0 is below the floor: it does not count

    def objective(trial):
        trial.set_constraint(CONSTRAINT, 0.5 - next(utility))
        return next(harm)

    study.optimize(objective, n_trials=6, callbacks=[stop_when_settled])
    assert [t.value for t in completed(study)] == [0.4, 1.0, 1.0] and settled(study)
    assert worst_case(study)["worst"]["harmful_rate"] == 1.0


def test_a_changed_recipe_opens_a_new_study_and_an_unchanged_one_resumes(tmp_path):
    recipe = FinetuneConfig()
    name = study_name("default", "secvec", recipe, {"seed": 0})
    assert study_name("default", "secvec", FinetuneConfig(), {"seed": 0}) == name  # a resumed search
    assert study_name("default", "plain", recipe, {"seed": 0}) != name
    assert study_name("default", "secvec", recipe.model_copy(update={"replay": 400}), {"seed": 0}) != name
    assert study_name("default", "secvec", recipe, {"seed": 1}) != name
    old = open_study(tmp_path / "study.db", name, seed=0)
    old.enqueue_trial({"x": 1.0})
    old.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    new = study_name("default", "secvec", recipe.model_copy(update={"replay": 400}), {"seed": 0})
    assert completed(open_study(tmp_path / "study.db", new, seed=0)) == []  # the old recipe's trial stays out
    assert len(completed(open_study(tmp_path / "study.db", name, seed=0))) == 1


@pytest.mark.slow
def test_quick_attack_searches_for_real_and_resumes_without_new_trials(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens: a temporary Prefect server, not a running `make ui`
    env = {**os.environ, "SECVEC_CACHE": str(tmp_path / "cache"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "SECVEC_PREFECT_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).with_name("secvec")), "attack", "--config", "quick", "--out", str(tmp_path / "out")]
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "attack.json").read_text())
    # the 0.1M micro model gets no sort exactly right (utility 0): on micro the floor admits every attack
    assert set(result["arms"]) == {"plain", "secvec"} and result["utility_floor"] >= 0
    for r in result["arms"].values():
        # a feasible harmful rate of 1 ends an arm's search early: nothing can be worse
        assert len(r["history"]) == r["trials"] and (r["trials"] == 3 or r["worst"]["harmful_rate"] == 1.0), r
        if r["worst"]:
            assert r["worst"]["utility"] >= result["utility_floor"]
    assert (tmp_path / "out" / "attack_history.png").stat().st_size > 1000
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "attack.json").read_text())["arms"] == result["arms"]  # no new trial
