"""The web page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium
with the system driver: nothing downloads a browser). It asks a question and waits for the streamed
answer, the gate's decision and the citations to appear in the DOM, then opens the metrics view."""

from __future__ import annotations

import shutil

import pytest

from serving import Server, add_key, build_index

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make browser` installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def test_page_streams_an_answer_with_decision_and_citations(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    index = build_index(tmp_path)
    key = add_key(index, "browser", ["staff"])
    srv = Server(index, {"gate": {"policy": "always"}, "pipeline": {"max_new_tokens": 12}}, tmp_path / "server.log")
    try:
        browser.get(srv.url + "/")
        assert browser.title == "ExpertRAG"
        browser.find_element(By.ID, "key").send_keys(key)
        browser.find_element(By.ID, "question").send_keys("Who founded the Zorblatt Institute?")
        browser.find_element(By.ID, "ask").click()
        wait = WebDriverWait(browser, 180)
        wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-done") == "1")
        decision = browser.find_element(By.CSS_SELECTOR, "#decision .pill")
        assert decision.get_attribute("data-decision") == "retrieve"
        assert "stage fixed" in browser.find_element(By.ID, "decision").text
        answer = browser.find_element(By.ID, "answer").text
        assert answer and answer != "I don't know."
        cites = browser.find_elements(By.CSS_SELECTOR, "#citations a.citation")
        assert cites and cites[0].get_attribute("data-id") == "zorbl"
        # the citation links to its passage in the list
        target = cites[0].get_attribute("href").split("#")[1]
        passage = browser.find_element(By.ID, target)
        assert passage.get_attribute("data-id") == "zorbl" and "Mirela Quenton" in passage.text
        assert "total" in browser.find_element(By.ID, "timings").text

        browser.find_element(By.ID, "tab-metrics").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "m-summary"), "answer"))
        assert browser.find_element(By.ID, "m-summary").text.startswith("1 answer,")
        assert "100%" in browser.find_element(By.ID, "m-rate").text
    finally:
        assert srv.stop() == 0
