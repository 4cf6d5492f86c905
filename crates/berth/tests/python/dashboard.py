"""berth's dashboard in a real browser: Debian's chromium, headless, driven by chromedriver.

    dashboard.py PORT ADMIN_KEY INFERENCE_KEY SCREENSHOT_DIR

The page asks for a key, refuses a wrong one, shows an inference key the models without the unload
button or the usage, draws the history as requests come in, streams an answer in the playground, and
shows an admin key every key's usage and the deployments, and lets it promote a canary and unload a
model; its console stays free of errors (but the expected 401s of the keyless
first look). Screenshots at desktop and phone widths go to SCREENSHOT_DIR.
"""

import json
import sys
import threading
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

port, admin_key, inference_key, shots = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
base = f"http://127.0.0.1:{port}"


def wait_for(what, check, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # the page is between states
            pass
        if time.time() > deadline:
            raise SystemExit(f"dashboard: not {what} within {timeout} s; status: {text('status')!r}")
        time.sleep(0.2)


def text(element_id):
    try:
        return driver.find_element(By.ID, element_id).text
    except Exception:
        return ""


def use_key(key):
    form = driver.find_element(By.ID, "key-form")
    wait_for("asked for a key", form.is_displayed)
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def click(selector):
    """Click what `selector` finds, found again if the page redrew it meanwhile (it does every 2 s)."""

    def found_and_clicked():
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait_for(f"letting {selector} be clicked", found_and_clicked)


def complete(n):
    body = json.dumps({"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}).encode()
    for _ in range(n):
        request = urllib.request.Request(
            base + "/v1/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {admin_key}"},
        )
        urllib.request.urlopen(request, timeout=60).read()


options = Options()
for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(base + "/ui")
    wait_for("saying it needs a key", lambda: "needs an API key" in text("status"))

    use_key("berth-not-a-key")
    wait_for("refusing the wrong key", lambda: "refused" in text("status"))

    # An inference key: models and charts, no unload button.
    use_key(inference_key)
    complete(1)
    wait_for("showing the loaded model", lambda: "ai/smollm2:latest" in text("models"))
    wait_for("naming the key", lambda: "viewer" in text("who"))
    assert not driver.find_elements(By.CSS_SELECTOR, "#models button"), "an inference key sees no unload button"
    assert not driver.find_element(By.ID, "usage-section").is_displayed(), "nor every key's usage"
    assert not driver.find_element(By.ID, "deployments-section").is_displayed(), "nor the deployments"

    # A burst of requests: the counters and the chart's latest point move.
    before = int(text("total-requests") or 0)
    burst = threading.Thread(target=complete, args=(12,))
    burst.start()
    wait_for("counting the burst", lambda: int(text("total-requests") or 0) >= before + 4, timeout=60)
    wait_for("drawing tokens per second", lambda: float(text("now-tokens") or 0) > 0 or not burst.is_alive(), 60)
    burst.join()
    wait_for("counting every request", lambda: int(text("total-requests") or 0) >= before + 12, timeout=30)
    # The tokens chart draws its line in the accent colour (the label is grey): once two samples
    # are in, the line has pixels of its own.
    line_pixels = (
        "const c = document.getElementById('chart-tokens');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > 150 && d[i] < 60) n++;"
        "return n;"
    )
    wait_for("drawing the tokens line", lambda: driver.execute_script(line_pixels) > 30, timeout=30)

    # The playground streams an answer, with its TTFT and speed.
    wait_for("listing the models", lambda: "ai/smollm2:latest" in text("play-model"))
    driver.find_element(By.ID, "play-max").clear()
    driver.find_element(By.ID, "play-max").send_keys("24")
    driver.find_element(By.ID, "play-prompt").send_keys("Write one sentence about harbours.")
    driver.find_element(By.ID, "play-send").click()
    wait_for("streaming an answer", lambda: "tokens/s" in text("play-stats"), timeout=60)
    answer = text("play-answer")
    assert len(answer) > 5, f"the playground's answer: {answer!r}"
    assert "TTFT" in text("play-stats"), text("play-stats")
    driver.set_window_size(1280, 1500)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    driver.save_screenshot(f"{shots}/dashboard-desktop.png")
    # A phone: 390 CSS pixels wide, as the browser's device emulation makes it.
    phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
    time.sleep(0.5)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    wide = driver.execute_script(
        "return [...document.querySelectorAll('body *')].filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > 392)"
        ".slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
    )
    assert width <= 392, f"the page is {width} px wide on a 390 px screen: {wide}"
    driver.save_screenshot(f"{shots}/dashboard-phone.png")
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.set_window_size(1280, 1000)

    # An admin key: the unload button, which unloads.
    driver.find_element(By.ID, "forget-key").click()
    use_key(admin_key)
    wait_for(
        "showing the unload button",
        lambda: driver.find_element(By.CSS_SELECTOR, "#models button[data-model='ai/smollm2:latest']"),
    )
    wait_for("showing usage by key", lambda: "ops" in text("usage") and "7 days" in text("usage"))
    # The deployment `chat` rolling out to v2: promoted from the page.
    wait_for("showing the rollout", lambda: "canary" in text("deployments"))
    click("#deployments button[data-action='promote']")
    wait_for("promoting the canary", lambda: "chat" in text("deployments") and "canary" not in text("deployments"))
    stable = driver.execute_script("return document.querySelector('#deployments tbody td:nth-child(2)').textContent")
    assert "smollm2:v2" in stable, f"the stable version after promoting: {stable!r}"
    wait_for("showing TTFT percentiles", lambda: "ms" in text("now-ttft"))
    click("#models button[data-model='ai/smollm2:latest']")
    wait_for("unloading the model", lambda: "ai/smollm2:latest" not in text("models"))

    # No console errors but the 401s of the first, keyless look and of the wrong key.
    errors = [
        e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]
    ]
    assert not errors, f"console errors: {errors}"
    print(f"dashboard: key asked and checked, burst counted, playground answered {len(answer)} characters "
          f"({text('play-stats')}), admin promoted the canary and unloaded the model, no console errors")
finally:
    driver.quit()
