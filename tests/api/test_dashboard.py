"""/dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real server under load: the numbers the page shows are the ones /metrics
gives, its plots move, and a screenshot is kept as the test's artifact (path printed)."""
from __future__ import annotations

import math
import re
import shutil
import threading
import time

import httpx
import pytest

from tests.api.conftest import make_engine, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no chromium / chromedriver binary: apt-get install chromium chromium-driver"),
]
webdriver = pytest.importorskip("selenium.webdriver")


def scrape(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.MULTILINE)}


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile (the dashboard's algorithm, written again independently)."""
    total = cumulative[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    i = next(i for i, (_, count) in enumerate(cumulative) if count >= rank)
    if math.isinf(cumulative[i][0]):
        return cumulative[i - 1][0]
    lower, below = (cumulative[i - 1][0], cumulative[i - 1][1]) if i else (0.0, 0.0)
    upper, count = cumulative[i]
    return upper if count == below else lower + (upper - lower) * (rank - below) / (count - below)


def window_buckets(after: dict[str, float], before: dict[str, float], name: str) -> list[tuple[float, float]]:
    pattern = re.compile(rf'^{name}_bucket\{{le="([^"]+)"\}}$')
    out = []
    for key, value in after.items():
        m = pattern.match(key)
        if m:
            out.append((float(m.group(1)), value - before.get(key, 0.0)))
    return sorted(out)


@pytest.fixture(scope="module")
def loaded_server(tiny_llama):
    engine = make_engine(tiny_llama)
    running = start_server(engine)
    yield running
    running.stop()
    engine.shutdown()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def load(base_url: str, stop: threading.Event) -> None:
    prefix = "class Cache(object):\n    def __init__(self, size):\n        self.size = size\n" * 2
    while not stop.is_set():
        body = {"inputs": prefix + "    def get(self, key):", "parameters": {"max_new_tokens": 40}}
        with httpx.stream("POST", base_url + "/generate_stream", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                pass


def page_value(driver, panel: str, index: int = 0) -> float:
    return float(driver.execute_script(f"return String(window.textgenDashboard.values['{panel}'][{index}])"))


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_dashboard_shows_what_metrics_says(loaded_server, browser, tmp_path):
    base = loaded_server.base_url
    before = scrape(base)
    browser.get(base + "/dashboard?interval=250&window=120")
    wait_until(lambda: browser.execute_script("return (window.textgenDashboard || {}).polls || 0") >= 1,
               "the page never read /metrics")
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(base, stop)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: browser.execute_script(
            "return Math.max(0, ...(window.textgenDashboard.series.batch || []).map(p => p.values[0]))") >= 2,
            "the running batch never showed on the page")
        wait_until(lambda: page_value(browser, "tokens") > 0, "no tokens/s on the page")
        wait_until(lambda: page_value(browser, "requests") >= 8, "no finished requests on the page")
        screenshot = tmp_path / "dashboard-under-load.png"
        browser.save_screenshot(str(screenshot))
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    after = scrape(base)
    wait_until(lambda: page_value(browser, "generated") == after["textgen_generation_tokens"],
               "the page never caught up with /metrics")
    for panel, name in (("requests", "tgi_request_success"), ("generated", "textgen_generation_tokens"),
                        ("queue", "tgi_queue_size"), ("batch", "tgi_batch_current_size"),
                        ("kv", "textgen_kv_cache_usage"), ("prefix", "textgen_prefix_cache_hit_rate")):
        assert page_value(browser, panel) == after[name], panel
    assert after["textgen_prefix_cache_hit_rate"] > 0 and after["tgi_request_success"] >= 4
    for panel, name in (("ttft", "textgen_time_to_first_token_seconds"),
                        ("itl", "textgen_inter_token_latency_seconds")):
        window = window_buckets(after, before, name)
        for i, q in enumerate((0.5, 0.9, 0.99)):
            assert page_value(browser, panel, i) == pytest.approx(quantile(q, window), rel=1e-9), (panel, q)
    shown = browser.find_element("css selector", '[data-panel="requests"]').text
    assert shown == str(int(after["tgi_request_success"]))
    assert browser.find_elements("css selector", 'svg[data-plot="batch"] polyline')
    final = tmp_path / "dashboard.png"
    browser.save_screenshot(str(final))
    assert screenshot.stat().st_size > 10_000 and final.stat().st_size > 10_000
    print(f"\ndashboard screenshots: {screenshot} {final}")
