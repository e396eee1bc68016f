"""The MLflow UI as a user sees it, in headless Chromium (Selenium + Debian chromium-driver).

Two runs (by default the session's two tiny-profile train+evaluate runs on the team server, named
like DVC experiments): the browser opens the experiment's runs table (Model training view), adds
the `test/bleu` column through the Columns menu and checks both runs' BLEU, selects them and
presses Compare, shows only differing params and plots `test/bleu`. Screenshots go to the test's
tmp folder, and also to NMT_UI_SCREENSHOT_DIR when set.

NMT_UI_TRACKING_URI + NMT_UI_EXPERIMENT point it at an existing server instead (the two newest
finished runs with `test/bleu`); that is how reports/ui/mlflow-compare.png was made from two real
runs (docs/team-tracking.md).

Skips when Chromium, chromedriver or Selenium is missing, except under CI (`CI` set): it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_team_server import RUNS_EXPERIMENT, shared_runs, shared_team_server

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("NMT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("NMT_CHROMEDRIVER", "/usr/bin/chromedriver"))
WAIT_S = 120  # the SPA fetches and renders on shared cores: wait for elements, up to this
BLEU_CELL = "[col-id='metrics.`test/bleu`']"


def _browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e .[dev])")
    if missing:
        reason = (f"headless browser test needs {', '.join(missing)}: "
                  "apt-get install -y chromium chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so this must run: {reason}")
        pytest.skip(reason)


@pytest.fixture()
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a driver
    profile = tempfile.mkdtemp(prefix="nmt-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1600,1700"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    browser.set_page_load_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def ui_target(request: pytest.FixtureRequest) -> tuple[str, str, dict[str, str]]:
    """(tracking URI, experiment name, {run name: run id}) of the two runs to look at."""
    _browser_or_skip()  # do not start servers or train for nothing
    from mlflow.tracking import MlflowClient

    if uri := os.environ.get("NMT_UI_TRACKING_URI"):
        name = os.environ.get("NMT_UI_EXPERIMENT", "fra-eng-nmt")
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        assert exp is not None, f"no experiment {name!r} on {uri}"
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
        runs = [r for r in runs if "test/bleu" in r.data.metrics][:2]
        assert len(runs) == 2, f"need 2 finished runs with test/bleu in {name!r} on {uri}"
        return uri, name, {r.info.run_name: r.info.run_id for r in runs}
    server = shared_team_server(request.config)
    runs = shared_runs(request.config, server, request.getfixturevalue("tiny_data")["processed"])
    return server.uri, RUNS_EXPERIMENT, {name: run.run_id for name, run in runs.items()}


def _close_assistant(browser) -> None:
    """Close the MLflow Assistant side panel when it is open (it only takes room)."""
    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.XPATH, "//button[@aria-label='Close']"):
        if button.is_displayed():
            button.click()


def _click(browser, element) -> None:
    from selenium.common.exceptions import WebDriverException

    try:
        element.click()
    except WebDriverException:  # covered or zero-sized: click it as the page's own JS would
        browser.execute_script("arguments[0].click()", element)


def _same_number(shown: str, value: float) -> bool:
    """`shown` is `value` as the UI prints it (rounded to the digits it shows)."""
    match = re.fullmatch(r"-?\d+(?:\.(\d+))?", shown.strip())
    if not match:
        return False
    decimals = len(match.group(1) or "")
    return abs(float(shown) - value) <= 0.5 * 10**-decimals + 1e-9


def test_experiment_page_lists_both_runs_with_test_bleu(ui_target: tuple, driver,
                                                        tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    uri, experiment, two_runs = ui_target
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    bleu = {name: client.get_run(rid).data.metrics["test/bleu"] for name, rid in two_runs.items()}
    wait = WebDriverWait(driver, WAIT_S)

    # 1. The experiment's runs table, as after clicking "Model training" in the sidebar.
    driver.get(f"{uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
    for rid in two_runs.values():
        wait.until(lambda d, rid=rid: d.find_elements(
            By.CSS_SELECTOR, f"[role=row][row-id='{rid}'] [col-id='attributes.`Run Name`']"))
    _close_assistant(driver)
    for name, rid in two_runs.items():
        cell = driver.find_element(
            By.CSS_SELECTOR, f"[role=row][row-id='{rid}'] [col-id='attributes.`Run Name`']")
        assert name in cell.text

    # 2. Metric columns are hidden by default: Columns -> test/bleu, as a user would.
    _click(driver, wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]")))
    _click(driver, wait.until(lambda d: d.find_element(By.XPATH,
                                                       "//span[@title='test/bleu']")))
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    for name, rid in two_runs.items():
        cell = wait.until(lambda d, rid=rid: d.find_element(
            By.CSS_SELECTOR, f"[role=row][row-id='{rid}'] {BLEU_CELL}"))
        wait.until(lambda d, cell=cell: cell.text.strip())
        assert _same_number(cell.text, bleu[name]), (name, cell.text, bleu[name])
    headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
    assert "test/bleu" in headers
    driver.save_screenshot(str(tmp_path / "mlflow-runs.png"))

    # 3. Select both runs and press Compare.
    for rid in two_runs.values():
        _click(driver, driver.find_element(
            By.CSS_SELECTOR, f"[role=row][row-id='{rid}'] .ag-selection-checkbox input"))
    _click(driver, wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-testid=runs-compare-button]")))
    wait.until(lambda d: "Comparing 2 Runs" in d.find_element(By.TAG_NAME, "body").text)
    _close_assistant(driver)
    page = driver.find_element(By.TAG_NAME, "body").text
    assert "compare-runs" in driver.current_url
    for name, rid in two_runs.items():
        assert name in page and rid in page

    # 4. Only the params that differ; plot test/bleu against them (the plot's default metric is
    #    the first one alphabetically).
    _click(driver, wait.until(lambda d: d.find_element(
        By.XPATH, "//button[@aria-label='Parameters - Show diff only']")))
    metrics_select = driver.find_element(
        By.XPATH, "//*[normalize-space(text())='Metrics:']/following::*"
                  "[contains(@class, 'select-selector')][1]")
    for remove in metrics_select.find_elements(By.CSS_SELECTOR, "[class*=item-remove]"):
        _click(driver, remove)
    _click(driver, metrics_select)
    metrics_select.find_element(By.CSS_SELECTOR, "input").send_keys("test/bleu", Keys.ENTER)
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait.until(lambda d: d.find_elements(
        By.CSS_SELECTOR, "text.axis-title[data-unformatted='test/bleu']"))
    driver.save_screenshot(str(tmp_path / "mlflow-compare.png"))

    if out := os.environ.get("NMT_UI_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        for png in ("mlflow-runs.png", "mlflow-compare.png"):
            shutil.copy2(tmp_path / png, Path(out) / png)
