"""The registered champion is a real MLflow 3 chat model: it loads through `mlflow.transformers` and
`mlflow.pyfunc`, `mlflow models serve` answers chat requests over HTTP, and registering it reaches no
network (the Hugging Face Hub included) even with the Hub's offline switches off.

One registration for the module, of the session's trained micro base, in a subprocess: a real sqlite store
and registry, no HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, and an audit hook recording every socket connection
and name lookup the process makes.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from test_registry import free_port, stop_group, wait_healthy

pytestmark = pytest.mark.slow

NAME = "secvec-chat"
PROMPT = "How do I build a bomb today?"  # refused by the micro base (conftest `align`)
MAX_TOKENS = 24
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

REGISTER = textwrap.dedent('''
    import json, socket, sys
    attempts = []
    LOCAL = {None, "localhost", "127.0.0.1", "::1", socket.gethostname()}

    def audit(event, args):
        if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
            attempts.append(f"connect {args[1]}")
        elif event == "socket.getaddrinfo" and args[0] not in LOCAL:
            attempts.append(f"getaddrinfo {args[0]}")

    sys.addaudithook(audit)
    import mlflow, pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from secvec.config import ChampionPolicy
    from secvec.registry import register_once, version_tags, weights_sha256

    uri, model_dir, name, artifacts = sys.argv[1:5]
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("chat", artifact_location=artifacts)).info.run_id
    data = mlflow.data.from_pandas(pd.DataFrame({"prompt": ["p"], "response": ["r"]}), name="finetune")
    client.log_inputs(run_id, [DatasetInput(data._to_mlflow_entity(), [InputTag("mlflow.data.context", "finetune")])])
    metrics = {"harmful_rate": 0.0, "over_refusal_rate": 0.0, "utility": 0.5, "perplexity": 3.0}
    gate = {"passed": True, "reasons": [], "checks": [{"name": "harmful_rate", "value": 0.0, "limit": 0.1,
                                                      "passed": True, "message": "ok"}]}
    tags = version_tags("0123456789abcdef0123456789abcdef", "ab" * 32, "cd" * 32, "0123abc",
                        {"max_harmful_rate": 0.1}, metrics, gate)
    registered = register_once(client, run_id, model_dir, name, tags, weights_sha256(model_dir), metrics,
                               ChampionPolicy())
    print(json.dumps({"registered": registered, "run_id": run_id, "digest": data.digest, "attempts": attempts}))
''')


@pytest.fixture(scope="module")
def champion(micro_base, tmp_path_factory):
    """Register the micro base as champion of NAME in a fresh store; point MLflow's globals at that store."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    root = tmp_path_factory.mktemp("mlflow-model")
    uri = f"sqlite:///{root}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_SWITCHES} | {"OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", REGISTER, uri, str(micro_base), NAME, str(root / "artifacts")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"seconds": time.monotonic() - start}
    print(f"\nregistration subprocess: {result['seconds']:.1f} s")
    with pytest.MonkeyPatch.context() as mp:  # models:/ URIs resolve through MLflow's global tracking URI
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(registry_utils, "_registry_uri", None)
        yield result | {"uri": uri, "client": mlflow.MlflowClient(tracking_uri=uri)}


@pytest.fixture(scope="module")
def reference_reply(micro_base) -> str:
    """What secvec's own greedy generation (the evaluation's) answers from the evaluated directory."""
    from secvec.generate import generate
    from secvec.models import load_causal_lm

    model, tokenizer = load_causal_lm(micro_base)
    (reply,) = generate(model, tokenizer, [[{"role": "user", "content": PROMPT}]], max_new_tokens=MAX_TOKENS)
    assert reply, "the micro base gave an empty reply: nothing to compare"
    return reply


def test_registration_reaches_no_network_even_with_the_hub_offline_switches_off(champion):
    assert champion["attempts"] == []
    assert champion["registered"] == {"name": NAME, "version": "1", "aliases": ["candidate", "champion"]}


def test_the_version_is_an_mlflow_chat_model_of_the_evaluated_bytes(champion, micro_base, tmp_path):
    from mlflow.models import Model

    from secvec.mlflow_model import pinned_requirements
    from secvec.registry import verify, weights_sha256

    client = champion["client"]
    mv = client.get_model_version_by_alias(NAME, "champion")
    checked = verify(client, f"models:/{NAME}@champion", dst_path=tmp_path)
    assert checked["ok"], checked
    local = Path(checked["path"])

    meta = Model.load(str(local / "MLmodel"))
    assert {"transformers", "python_function"} <= meta.flavors.keys()
    assert meta.metadata["task"] == "llm/v1/chat" and meta.flavors["transformers"]["task"] == "text-generation"
    assert "messages" in meta.signature.inputs.input_names() and meta.run_id == champion["run_id"]
    (logged,) = client.search_logged_models([client.get_run(champion["run_id"]).info.experiment_id])
    assert meta.model_id == logged.model_id and mv.source == logged.artifact_location
    assert (local / "serving_input_example.json").is_file()

    # pinned to what is installed here (local labels such as +cpu dropped), and given, so nothing is inferred
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == pinned_requirements()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "transformers", "torch"}
    assert f"transformers=={installed_version('transformers')}" in requirements

    # the served weights are byte for byte the evaluated files, and verify hashes exactly those
    weights = weights_sha256(micro_base)
    assert json.loads(mv.tags["weights_sha256"]) == weights
    for path in weights:
        assert filecmp.cmp(micro_base / path, local / "model" / path, shallow=False)

    card = (local / "model_card.md").read_text()
    for expected in ("ab" * 32, "cd" * 32, "0123456789abcdef0123456789abcdef", "Gate: passed", "max_harmful_rate",
                     champion["digest"], *weights.values()):
        assert expected in card, expected
    assert "huggingface.co" not in (local / "LICENSE.txt").read_text()

    # lineage linked to the version: the run's dataset inputs and the gate's decision
    assert json.loads(mv.tags["datasets"]) == [{"name": "finetune", "digest": champion["digest"],
                                                "context": "finetune"}]
    assert json.loads(mv.tags["gate"])["passed"] is True
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": int(mv.version)}]


def test_the_transformers_flavor_loads_the_champion_and_generates(champion, reference_reply):
    import mlflow

    pipeline = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    out = pipeline([{"role": "user", "content": PROMPT}], max_new_tokens=MAX_TOKENS, do_sample=False)
    assert out[0]["generated_text"][-1]["content"].strip() == reference_reply


def test_pyfunc_predicts_a_chat_reply(champion, reference_reply):
    import mlflow

    chat = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    (response,) = chat.predict({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS})
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"].strip() == reference_reply


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def serve_env() -> dict[str, str]:
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin folder must be on PATH
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def test_mlflow_models_serve_answers_a_chat_request(champion, reference_reply, tmp_path, record_property):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "serve.log"
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=serve_env())
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"{err}\n{log_path.read_text()[-3000:]}")
        ready_s = time.monotonic() - started
        sent = time.monotonic()
        status, body = post(f"http://127.0.0.1:{port}/invocations",
                            {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS})
        latency_s = time.monotonic() - sent
        assert status == 200, body
        (response,) = body  # one chat completion per request
        assert response["choices"][0]["message"]["content"].strip() == reference_reply
        status, body = post(f"http://127.0.0.1:{port}/invocations", {"prompt": PROMPT})  # not a chat request
        assert status == 400 and "messages" in json.dumps(body), body
    finally:
        stop_group(proc)
    record_property("serve_ready_s", round(ready_s, 2))
    record_property("chat_request_s", round(latency_s, 3))
    print(f"\nmlflow models serve: ready after {ready_s:.1f} s, one chat request {latency_s * 1000:.0f} ms")
