"""The UIs as a person sees them: a micro pipeline run, then `secvec ui` over its stores, read in headless
system Chromium driven by Selenium.

Screenshots go to a temporary folder, or to $SECVEC_SCREENSHOTS (`SECVEC_SCREENSHOTS=docs/img` regenerates
the README's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.common import exceptions
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SECVEC = str(Path(sys.executable).parent / "secvec")
WAIT_S = 90  # a single-page app's first render, on 2 cores shared with other jobs
STAGES = ("prepare-data", "bootstrap-base", "fit-security-vector", "vector-coverage", "screen", "finetune",
          "strip-vector", "evaluate-base", "evaluate-clean", "gate", "register-clean-backbone")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{url} never became healthy; `secvec ui` said:\n{log.read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def uis(tmp_path_factory):
    """A finished micro run in temporary stores (the session's stage cache), then `secvec ui` over them."""
    root = tmp_path_factory.mktemp("browser")
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "SECVEC_PREFECT_PORT": str(prefect_port), "SECVEC_MLFLOW_PORT": str(mlflow_port)}
    env.pop("PREFECT_API_URL", None)  # the run starts its own temporary server, writing PREFECT_HOME
    run = subprocess.run([SECVEC, "run", "--config", "micro", "--out", str(root / "out")], env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((root / "out" / "report.json").read_text())

    log = root / "ui.log"  # a file, not a pipe: the servers' access logs would fill a pipe nobody reads
    with log.open("w") as out:
        ui = subprocess.Popen([SECVEC, "ui"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        _wait_healthy(f"{prefect}/api/health", ui, log)
        _wait_healthy(f"{mlflow}/health", ui, log)
        flow_runs = httpx.post(f"{prefect}/api/flow_runs/filter", json={}, timeout=10).json()
        assert len(flow_runs) == 1, flow_runs
        task_runs = httpx.post(f"{prefect}/api/task_runs/filter", json={}, timeout=10).json()
        yield {"prefect": prefect, "mlflow": mlflow, "report": report, "out": root / "out",
               "flow_run": flow_runs[0]["name"], "task_runs": len(task_runs)}
    finally:
        ui.terminate()  # `secvec ui` stops both servers with it
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("headless Chromium is missing: `apt-get install -y chromium chromium-driver` (.ci/run does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100",
                "--lang=en-US"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager, which would download a driver, never runs.
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    chosen = os.environ.get("SECVEC_SCREENSHOTS")
    folder = (ROOT / chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _until(driver, what: str, condition):
    """Wait for the page to show `condition`; on a timeout, fail with what the page showed. A re-rendering
    single-page app replaces elements under our feet: those attempts are retried."""
    try:
        return WebDriverWait(driver, WAIT_S, ignored_exceptions=(
            exceptions.StaleElementReferenceException, exceptions.ElementClickInterceptedException)).until(condition)
    except exceptions.TimeoutException:
        pytest.fail(f"{driver.current_url} never showed {what}; it showed:\n{_text(driver)[:3000]}")


def _see(driver, *texts: str) -> str:
    return _until(driver, repr(texts), lambda d: (page := _text(d)) and all(t in page for t in texts) and page)


def _click(driver, text: str) -> None:
    """Click the innermost visible element whose whole text is `text` (a tab, a link, a toggle)."""
    xpath = f"//*[normalize-space(.)='{text}'][not(*[normalize-space(.)='{text}'])]"

    def clicked(d) -> bool:
        element = next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None)
        return bool(element) and element.click() is None

    _until(driver, text, clicked)


def _mlflow_open(driver, mlflow: str, route: str) -> None:
    """Open `route` of the MLflow UI in its model-training view. MLflow 3 opens in its GenAI view with an
    assistant panel: switch the view (it leaves the page it is on) and close the panel, as a person would."""
    driver.get(f"{mlflow}/#/")
    _click(driver, "Model training")
    for close in driver.find_elements(By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
        if close.is_displayed():
            close.click()
    driver.get(f"{mlflow}/#{route}")


def test_prefect_ui_shows_the_flow_run_its_task_runs_and_the_gate_report(browser, uis, shots):
    report, name, n = uis["report"], uis["flow_run"], uis["task_runs"]
    browser.get(f"{uis['prefect']}/runs")
    _see(browser, name, "secvec-pipeline", "Completed")
    _click(browser, name)
    _see(browser, "Completed", f"{n} Task runs")
    _click(browser, "Task Runs")
    page = _see(browser, f"({n} Completed)", "register-clean-backbone")
    listed = {re.sub(r"-[0-9a-f]{3}$", "", line) for line in page.splitlines()}
    assert set(STAGES) <= listed, f"task runs missing from the list: {set(STAGES) - listed}"
    browser.save_screenshot(str(shots / "prefect_flow_run.png"))

    _click(browser, "Artifacts")
    _see(browser, "secvec-gate-report", "secvec-metrics")
    _click(browser, "secvec-gate-report")
    base, plain, clean = (report[k]["harmful_rate"] for k in ("base", "plain", "clean"))
    reg = report["registered"]
    page = _see(browser, "secvec run: gate PASSED", f"Registered: {reg['name']} version {reg['version']}")
    assert f"harmful_rate {base:.3f} {plain:.3f} {clean:.3f}" in page  # a rendered table row, not raw markdown
    assert "# secvec run" not in page and "|---|" not in page
    browser.save_screenshot(str(shots / "prefect_artifact.png"))


def test_mlflow_ui_shows_the_registered_model_with_its_aliases(browser, uis, shots):
    reg = uis["report"]["registered"]
    _mlflow_open(browser, uis["mlflow"], f"/models/{reg['name']}")
    _see(browser, reg["name"], f"Version {reg['version']}")
    row = f"//*[@role='row'][.//a[normalize-space(.)='Version {reg['version']}']]"
    _until(browser, "both aliases on the version's row", lambda d: {"@ candidate", "@ champion"} <= {
        line.strip() for e in d.find_elements(By.XPATH, row) for line in e.text.splitlines()})
    browser.save_screenshot(str(shots / "mlflow_model.png"))


# The sha256 of every image the page shows (decoded, from its blob URL): which file the UI really displays.
SHOWN_IMAGES_SHA256 = """
const done = arguments[arguments.length - 1];
const hex = buf => [...new Uint8Array(buf)].map(b => b.toString(16).padStart(2, "0")).join("");
Promise.all([...document.querySelectorAll("img[src^='blob:']")].filter(img => img.naturalWidth > 0).map(
    img => fetch(img.src).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest("SHA-256", b)).then(hex)
        .catch(() => null))).then(done);
"""


def test_mlflow_ui_shows_the_run_metrics_and_plots(browser, uis, shots):
    report, reg, mlflow = uis["report"], uis["report"]["registered"], uis["mlflow"]
    run_id = report["mlflow"]["run_id"]
    run = httpx.get(f"{mlflow}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    run_page = f"/experiments/{run['info']['experiment_id']}/runs/{run_id}"
    _mlflow_open(browser, mlflow, run_page)
    _see(browser, "clean/harmful_rate", "Registered models")
    _until(browser, "the metrics' search box", lambda d: next(
        (e for e in d.find_elements(By.CSS_SELECTOR, "input[placeholder='Search metrics']") if e.is_displayed()),
        None)).send_keys("clean/")
    page = _until(browser, "only the clean metrics", lambda d: "bootstrap/loss" not in (p := _text(d))
                  and "clean/perplexity" in p and p)
    shown = dict(re.findall(r"^clean/(\w+)\n([-\d.e+]+)$", page, re.MULTILINE))
    for key in ("harmful_rate", "harmful_refusal_rate", "over_refusal_rate", "utility", "perplexity"):
        assert float(shown[key]) == pytest.approx(report["clean"][key]), (key, shown)
    assert re.search(r"\bgate\s*:\s*passed", page) and re.search(rf"{reg['name']}\s+v{reg['version']}\b", page)
    browser.save_screenshot(str(shots / "mlflow_run.png"))

    # The report's plots, from the artifact store: opened by their address, then by a click in the tree.
    browser.get(f"{mlflow}/#{run_page}/artifacts/report/finetune_losses.png")
    for plot in ("finetune_losses.png", "metrics.png"):
        _click(browser, plot)
        sha = hashlib.sha256((uis["out"] / plot).read_bytes()).hexdigest()
        _until(browser, f"the plot {plot}", lambda d, plot=plot, sha=sha: f"report/{plot}" in _text(d)
               and sha in d.execute_async_script(SHOWN_IMAGES_SHA256))
    browser.save_screenshot(str(shots / "mlflow_plot.png"))
