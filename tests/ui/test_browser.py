"""The web page at `/ui/` in a real headless Chromium against two real daemons (tests/ui/conftest.py):
search a study, send it to the other daemon and watch the job reach 100 %, pause and resume a
slower one, cancel one, the peers' states, a narrow window, the keyboard.

The page's contract (selectors) is the one of issue 14: tabs `#tab-studies|peers|jobs`, the search
form `#q-*` and `#search`, `#study-results tr[data-study-id]`, `#send-peer`, `#send-compression`,
`#send`, `#send-status`, `#peer-list tr[data-peer]`, `#job-list [data-job-id]`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest

from tests.dicom_data import make_instance
from tests.transfers.pair import Node
from tests.ui.conftest import save_screenshot

pytestmark = pytest.mark.slow

WAIT = 30  # seconds, every wait for the page


def dataset(tag: str, name: str, count: int) -> list[bytes]:
    """`count` CT instances of 39 kB (two buckets each at BucketSize 16 KiB), one study."""
    study = f"1.2.826.0.1.3680043.10.777.{tag}"
    return [make_instance(patient_id=f"UI-{tag}", study_uid=study, series_uid=f"{study}.1",
                          sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i,
                          PatientName=name, StudyDescription=f"UI study {tag}",
                          AccessionNumber=f"ACC{tag}")
            for i in range(count)]


def upload(node: Node, files: list[bytes]) -> str:
    """The Orthanc ID of the study of `files`, uploaded to `node`."""
    return node.upload(files)[0]["ParentStudy"]


def study_md5s(node: Node, study_id: str) -> dict[str, str]:
    answer = node.http.get(f"/studies/{study_id}/instances")
    assert answer.status_code == 200, answer.text
    return {i["ID"]: hashlib.md5(node.http.get(f"/instances/{i['ID']}/file").content).hexdigest()
            for i in answer.json()}


# -- the page ---------------------------------------------------------------------------------

def wait(driver: Any, condition, what: str, timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: _safely(condition, d, WebDriverException), message=f"waited {timeout} s for {what}")


def _safely(condition, driver, errors) -> Any:
    try:
        return condition(driver)
    except errors:
        return False


def find(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def finds(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver: Any, pair) -> None:
    driver.get(f"{pair.a.url}/ui/")
    wait(driver, lambda d: find(d, "#tab-studies").is_displayed(), "the page")


def show_tab(driver: Any, name: str) -> None:
    find(driver, f"#tab-{name}").click()
    wait(driver, lambda d: find(d, f"#{name}").is_displayed()
         and find(d, f"#{name}").get_attribute("hidden") is None, f"the {name} tab")


def search(driver: Any, patient_name: str, *expected: str) -> None:
    """Search by patient name; with `expected`, wait for exactly these studies in the results (the
    page lists every study when it opens: the row must come from this search, not that one)."""
    box = find(driver, "#q-patient-name")
    box.clear()
    box.send_keys(patient_name)
    find(driver, "#search").click()
    if expected:
        wait(driver, lambda d: sorted(result_ids(d)) == sorted(expected),
             f"the results of the search {patient_name!r}: {expected}")


def result_ids(driver: Any) -> list[str]:
    return [row.get_attribute("data-study-id") for row in finds(driver, "#study-results tr[data-study-id]")]


def study_row(driver: Any, study_id: str) -> Any:
    return wait(driver, lambda d: next(iter(finds(d, f'#study-results tr[data-study-id="{study_id}"]')), None),
                f"the row of study {study_id}")


def choose(driver: Any, css: str, value: str) -> None:
    """Select the option `value` (its value, or failing that its text) of the <select> `css`."""
    from selenium.webdriver.support.ui import Select

    wait(driver, lambda d: any(o.get_attribute("value") == value or value in o.text.lower()
                               for o in Select(find(d, css)).options), f"option {value!r} in {css}")
    select = Select(find(driver, css))
    for option in select.options:
        if option.get_attribute("value") == value:
            select.select_by_value(value)
            return
    select.select_by_visible_text(next(o.text for o in select.options if value in o.text.lower()))


def job_ids(node: Node) -> set[str]:
    return set(node.http.get("/jobs").json())


def send(driver: Any, pair, study_id: str, peer: str, compression: str = "gzip") -> str:
    """Select the study's row, send it to `peer`: the new job's ID (as the daemon lists it)."""
    def select(d) -> bool:
        checkbox = study_row(d, study_id).find_element("css selector", "input.select-study")
        if not checkbox.is_selected():
            checkbox.click()
        return checkbox.is_selected()

    wait(driver, select, f"study {study_id} selected")
    choose(driver, "#send-peer", peer)
    choose(driver, "#send-compression", compression)
    before = job_ids(pair.a)
    find(driver, "#send").click()
    new = wait(driver, lambda d: job_ids(pair.a) - before, "the daemon's new job")
    assert len(new) == 1, new
    job_id = new.pop()
    # textContent: the Studies tab (and its status line) is hidden once the page shows the jobs
    wait(driver, lambda d: job_id in find(d, "#send-status").get_attribute("textContent"),
         "the job ID in #send-status")
    wait(driver, lambda d: find(d, "#jobs").is_displayed(), "the Jobs tab after sending")
    return job_id


def job(driver: Any, job_id: str) -> Any:
    return wait(driver, lambda d: next(iter(finds(d, f'#job-list [data-job-id="{job_id}"]')), None),
                f"job {job_id} in the list")


def job_state(driver: Any, job_id: str) -> str:
    return job(driver, job_id).find_element("css selector", ".job-state").text.strip()


PROGRESS = """
const el = arguments[0].querySelector('.job-progress');
if (!el) return null;
if (el.dataset.progress !== undefined && el.dataset.progress !== '') return Number(el.dataset.progress);
const bar = el.tagName === 'PROGRESS' ? el : el.querySelector('progress');
if (!bar) return null;
return Math.round(100 * bar.value / (bar.max || 1));
"""


def job_progress(driver: Any, job_id: str) -> float | None:
    return driver.execute_script(PROGRESS, job(driver, job_id))


def wait_state(driver: Any, job_id: str, *states: str, timeout: float = WAIT) -> str:
    return wait(driver, lambda d: (s := job_state(d, job_id)) in states and s,
                f"job {job_id} in state {'/'.join(states)}", timeout)


def click_job_button(driver: Any, job_id: str, button: str) -> None:
    element = wait(driver, lambda d: (b := job(d, job_id).find_element("css selector", f"button.{button}")).is_enabled()
                   and b.is_displayed() and b, f"an enabled {button} button on job {job_id}")
    element.click()


# -- the tests --------------------------------------------------------------------------------

def test_search_send_and_watch_the_job_to_the_end(driver, pair, screenshots):
    study_id = upload(pair.a, dataset("1", "FAST^ALICE", 4))
    decoy = upload(pair.a, dataset("5", "DECOY^ZED", 1))
    open_page(driver, pair)
    show_tab(driver, "studies")
    search(driver, "FAST^ALICE", study_id)
    assert decoy not in result_ids(driver)
    row = study_row(driver, study_id)
    wait(driver, lambda d: "4" in row.find_element("css selector", "td.instances").text, "the instance count")
    save_screenshot(driver, screenshots, "studies")

    job_id = send(driver, pair, study_id, "b", "gzip")
    assert find(driver, "#studies").get_attribute("hidden") is not None
    assert wait_state(driver, job_id, "Success", "Failure") == "Success", pair.a.job(job_id)
    wait(driver, lambda d: job_progress(d, job_id) == 100, "progress 100 %")
    save_screenshot(driver, screenshots, "jobs-success")

    assert pair.a.job(job_id)["State"] == "Success"
    assert study_id in pair.b.http.get("/studies").json()
    assert study_md5s(pair.b, study_id) == study_md5s(pair.a, study_id)
    assert len(study_md5s(pair.b, study_id)) == 4


def test_pause_and_resume_a_slower_transfer(driver, pair, screenshots):
    # through `b-proxy`: 0.25 s per bucket, 2 threads, 48 buckets: about 6 s of transfer
    study_id = upload(pair.a, dataset("2", "SLOW^BOB", 24))
    open_page(driver, pair)
    search(driver, "SLOW^BOB", study_id)
    job_id = send(driver, pair, study_id, "b-proxy", "gzip")

    wait_state(driver, job_id, "Running")
    wait(driver, lambda d: (job_progress(d, job_id) or 0) >= 20, "some progress")
    row = job(driver, job_id)
    for part in (".job-speed", ".job-eta", "canvas.job-plot"):
        assert row.find_elements("css selector", part), f"no {part} in the job's row"
    time.sleep(1.2)  # a few points on the plot
    save_screenshot(driver, screenshots, "jobs-running", docs=True)

    click_job_button(driver, job_id, "pause")
    wait_state(driver, job_id, "Paused")
    assert pair.a.job(job_id)["State"] == "Paused"
    save_screenshot(driver, screenshots, "jobs-paused")

    click_job_button(driver, job_id, "resume")
    assert wait_state(driver, job_id, "Running", "Success") in ("Running", "Success")
    assert wait_state(driver, job_id, "Success", "Failure") == "Success", pair.a.job(job_id)
    wait(driver, lambda d: job_progress(d, job_id) == 100, "progress 100 %")
    assert study_md5s(pair.b, study_id) == study_md5s(pair.a, study_id)
    assert len(study_md5s(pair.b, study_id)) == 24


def test_cancel_shows_a_failed_job_with_its_error(driver, pair, screenshots):
    study_id = upload(pair.a, dataset("3", "CANCEL^CAROL", 16))
    open_page(driver, pair)
    search(driver, "CANCEL^CAROL", study_id)
    job_id = send(driver, pair, study_id, "b-proxy", "none")
    wait_state(driver, job_id, "Running")

    click_job_button(driver, job_id, "cancel")
    assert wait_state(driver, job_id, "Failure", "Success") == "Failure"
    error = wait(driver, lambda d: (e := job(d, job_id).find_elements("css selector", ".job-error"))
                 and e[0].text.strip(), "the failed job's error")
    assert error
    wait(driver, lambda d: job(d, job_id).find_element("css selector", "button.resubmit").is_enabled(),
         "an enabled resubmit button")
    assert not job(driver, job_id).find_element("css selector", "button.pause").is_enabled()
    save_screenshot(driver, screenshots, "jobs-failed")
    assert pair.a.job(job_id)["State"] == "Failure"


def test_peers_with_their_states_and_reasons(driver, pair, screenshots):
    expected = pair.a.http.get("/transfers/peers").json()
    assert expected["b"] == "installed" and expected["dead"] == "disabled"
    open_page(driver, pair)
    show_tab(driver, "peers")

    def state(d, name: str) -> str:
        return find(d, f'#peer-list tr[data-peer="{name}"] td.state').text.strip()

    wait(driver, lambda d: state(d, "b") == "installed", "peer b installed")
    wait(driver, lambda d: state(d, "dead") == "disabled", "peer dead disabled")
    wait(driver, lambda d: find(d, '#peer-list tr[data-peer="dead"] td.reason').text.strip(),
         "the reason why `dead` is disabled")
    wait(driver, lambda d: state(d, "b-bidir") == expected["b-bidir"], f"peer b-bidir {expected['b-bidir']}")
    save_screenshot(driver, screenshots, "peers")


def test_a_narrow_window_and_the_keyboard(driver, pair, screenshots):
    from selenium.webdriver.common.keys import Keys

    study_id = upload(pair.a, dataset("4", "KEYS^DAVE", 1))
    other = upload(pair.a, dataset("6", "KEYS^ERIN", 1))
    driver.set_window_size(420, 800)
    try:
        open_page(driver, pair)
        show_tab(driver, "studies")
        width = driver.execute_script("return window.innerWidth")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width, \
            "horizontal scrolling at 420 px"
        for css in ("#tab-studies", "#tab-peers", "#tab-jobs", "#q-patient-name", "#search"):
            element = find(driver, css)
            assert element.is_displayed(), f"{css} hidden at 420 px"
            right = driver.execute_script("return arguments[0].getBoundingClientRect().right", element)
            assert right <= width + 0.5, f"{css} beyond the window's right edge ({right} > {width})"
        save_screenshot(driver, screenshots, "studies-narrow")

        search(driver, "KEYS^*", study_id, other)  # both listed: what the keyboard's search narrows
        box = find(driver, "#q-patient-name")
        box.clear()
        box.click()
        box.send_keys("KEYS^DAVE")
        for _ in range(30):  # through the other fields (a date input takes a Tab per part)
            if driver.switch_to.active_element.get_attribute("id") == "search":
                break
            driver.switch_to.active_element.send_keys(Keys.TAB)
        assert driver.switch_to.active_element.get_attribute("id") == "search", "Tab never reached #search"
        driver.switch_to.active_element.send_keys(Keys.ENTER)
        wait(driver, lambda d: result_ids(d) == [study_id], "the keyboard's search result")
    finally:
        driver.set_window_size(1280, 800)
