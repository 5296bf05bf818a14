"""The web chat in headless Chromium (Debian's chromium + chromedriver, driven by selenium):
streamed tokens arrive, the swarm panel lists the 3 node processes and their layers and
marks a killed node down, hostile markup in a reply creates no element, and a screenshot is
saved (target/web_chat.png)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, TypeVar

import pytest

from conftest import ROOT, cli_binary, smollm2_path

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 60.0) -> T:
    """Polls `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Swarm:
    """Three `neuroshard node` processes (layers 0-10, 10-20, 20-30) and `neuroshard serve`."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ns-web-")
        self.nodes: List[subprocess.Popen] = []
        first = ""
        for start, end in [(0, 10), (10, 20), (20, 30)]:
            args = [cli_binary(), "node", "--model", smollm2_path(), "--start", str(start),
                    "--end", str(end), "--key-file", os.path.join(self.dir, f"key{start}")]
            if first:
                args += ["--peers", first]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True)
            self.nodes.append(proc)
            assert proc.stdout is not None
            address = proc.stdout.readline().strip()
            assert "@127.0.0.1:" in address, address
            first = first or address
        self.serve = subprocess.Popen(
            [cli_binary(), "serve", "--peers", first, "--http", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.serve.stdout is not None
        self.url = self.serve.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def close(self) -> None:
        for p in [self.serve, *self.nodes]:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def web() -> Iterator[Swarm]:
    swarm = Swarm()
    try:
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("chromium and chromedriver are missing (scripts/test.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1200,900"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def texts(browser: webdriver.Chrome, selector: str) -> List[str]:
    """The text of every element matching `selector`, read in one script (the panel
    re-renders every second, so element handles go stale)."""
    return list(browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector))


def answers(browser: webdriver.Chrome) -> List[str]:
    return texts(browser, ".msg.assistant")


def ask(browser: webdriver.Chrome, text: str) -> None:
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def set_greedy(browser: webdriver.Chrome) -> None:
    browser.find_element(By.ID, "settings-toggle").click()
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "settings-toggle").click()


def test_web_chat_streams_shows_the_swarm_and_stays_inert(web: Swarm, browser: webdriver.Chrome) -> None:
    browser.get(web.url + "/")
    # The swarm panel lists the 3 nodes and their layer ranges.
    rows = wait_for("3 nodes in the panel",
                    lambda: (r := texts(browser, "#coverage .node")) and len(r) == 3 and r)
    labels = " ".join(rows)
    for layers in ["layers 0-10", "layers 10-20", "layers 20-30"]:
        assert layers in labels, labels
    set_greedy(browser)

    # Streamed tokens arrive: the answer grows over several observations before it ends.
    ask(browser, "Write three sentences about the sea.")
    lengths = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = answers(browser)
        if current:
            lengths.append(len(current[-1]))
        if browser.find_element(By.ID, "send").is_enabled() and current and current[-1]:
            break
        time.sleep(0.02)
    grew = sorted(set(n for n in lengths if n > 0))
    assert len(grew) >= 3, f"the answer did not stream: lengths {grew}"
    route = wait_for("the route", lambda: texts(browser, "#route li"))
    assert len(route) == 3

    # Hostile markup in replies (this model echoes these prompts greedily) stays text.
    for prompt, markup in [
        ("Print exactly this line and nothing else: <img src=x onerror=alert(1)>", "<img"),
        ('Print exactly this and nothing else: <img src=x onerror="alert(1)"> '
         "<script>alert(2)</script>", "<script>"),
    ]:
        browser.find_element(By.ID, "new-chat").click()
        before = len(answers(browser))
        ask(browser, prompt)
        wait_for("the reply", lambda: len(answers(browser)) > before
                 and browser.find_element(By.ID, "send").is_enabled())
        reply = answers(browser)[-1]
        assert markup in reply, f"precondition: the reply should contain {markup}: {reply!r}"
    assert browser.find_elements(By.CSS_SELECTOR, "#messages img, #messages script") == []
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    # No alert() ran (selenium would report an open alert on the next command).
    assert browser.title == "NeuroShard chat"

    out = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "web_chat.png"
    browser.save_screenshot(str(out))

    # A phone-sized viewport: the composer and the panel stay inside the screen's width.
    browser.set_window_size(390, 844)
    fits = browser.execute_script(
        "const w = document.documentElement.clientWidth;"
        "return ['prompt', 'send', 'swarm'].every(id => {"
        "  const r = document.getElementById(id).getBoundingClientRect();"
        "  return r.width > 0 && r.left >= 0 && r.right <= w + 1; })"
        " && document.documentElement.scrollWidth <= w + 1")
    widths = browser.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollWidth]")
    assert fits, f"the page overflows a 390-px-wide viewport (client, scroll width: {widths})"
    browser.save_screenshot(str(out.with_name("web_chat_phone.png")))
    browser.set_window_size(1200, 900)

    # Kill the last node: the panel marks it down and the layers it served as uncovered.
    web.nodes[2].send_signal(signal.SIGKILL)
    web.nodes[2].wait(timeout=10)
    def marked() -> bool:
        rows = texts(browser, "#coverage .node")
        # Down while its announcement lasts, then gone and its layers uncovered.
        return any("down" in r for r in rows) or (
            len(rows) == 2 and "without a node" in texts(browser, "#swarm-status")[0])

    wait_for("the killed node marked down", marked, timeout=30)
