"""berth's dashboard in a real browser: Debian's chromium, headless, driven by chromedriver.

    dashboard.py PORT ADMIN_KEY INFERENCE_KEY SCREENSHOT_DIR

The page asks for a key, refuses a wrong one, shows an inference key the models without any button
and without the usage or the deployments, draws the history as requests come in (all models, and
one model chosen), streams an answer in the playground (free, then held to a JSON schema), and
shows an admin key every key's and every model's usage and the deployments with their traffic and
guards, and lets it step, promote and roll back a rollout, and load, pin, unpin and unload models;
its console stays free of errors (but the expected 401s of the keyless first look). Screenshots at
desktop and phone widths go to SCREENSHOT_DIR.
"""

import json
import sys
import threading
import time

from browser import Browser, By, post

port, admin_key, inference_key, shots = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
base = f"http://127.0.0.1:{port}"
MODEL = "ai/smollm2:latest"
# A copy of the model that nothing loads but the page.
SPARE = "ai/smollm2:spare"


def complete(n):
    for _ in range(n):
        post(base, "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}, admin_key)


def model_button(action, model):
    return f"#models button[data-action='{action}'][data-model='{model}']"


def model_row(model):
    """The cells of `model`'s row in the models table."""
    for row in b.driver.find_elements(By.CSS_SELECTOR, "#models tbody tr"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        if cells and cells[0] == model:
            return cells
    return []


b = Browser("dashboard")
driver = b.driver
try:
    driver.get(base + "/ui")
    b.wait_for("saying it needs a key", lambda: "needs an API key" in b.text("status"))

    b.use_key("berth-not-a-key")
    b.wait_for("refusing the wrong key", lambda: "refused" in b.text("status"))

    # An inference key: models and charts, no buttons.
    b.use_key(inference_key)
    complete(1)
    b.wait_for("showing the loaded model", lambda: model_row(MODEL)[2:3] == ["ready"])
    b.wait_for("listing the store's other models", lambda: "on disk" in " ".join(model_row(SPARE)), show="models")
    b.wait_for("naming the key", lambda: "viewer" in b.text("who"))
    assert not driver.find_elements(By.CSS_SELECTOR, "#models button"), "an inference key sees no model buttons"
    assert not driver.find_element(By.ID, "usage-section").is_displayed(), "nor every key's usage"
    assert not driver.find_element(By.ID, "deployments-section").is_displayed(), "nor the deployments"

    # A burst of requests: the counters and the chart's latest point move.
    before = int(b.text("total-requests") or 0)
    burst = threading.Thread(target=complete, args=(12,))
    burst.start()
    b.wait_for("counting the burst", lambda: int(b.text("total-requests") or 0) >= before + 4, timeout=60)
    b.wait_for("drawing tokens per second", lambda: float(b.text("now-tokens") or 0) > 0 or not burst.is_alive(), 60)
    burst.join()
    b.wait_for("counting every request", lambda: int(b.text("total-requests") or 0) >= before + 12, timeout=30)
    b.wait_for("drawing the tokens line", lambda: b.chart_pixels("chart-tokens") > 30, timeout=30)

    # The history of one model: all the burst was smollm2's.
    b.choose("chart-of", MODEL)
    b.wait_for("showing the model's own history", lambda: int(b.text("total-requests") or 0) >= before + 12)

    # The playground streams an answer, with its TTFT and speed.
    b.wait_for("listing the models", lambda: MODEL in b.text("play-model"))
    driver.find_element(By.ID, "play-max").clear()
    driver.find_element(By.ID, "play-max").send_keys("24")
    driver.find_element(By.ID, "play-prompt").send_keys("Write one sentence about harbours.")
    driver.find_element(By.ID, "play-send").click()
    b.wait_for("streaming an answer", lambda: "tokens/s" in b.text("play-stats"), timeout=60)
    answer = b.text("play-answer")
    assert len(answer) > 5, f"the playground's answer: {answer!r}"
    assert "TTFT" in b.text("play-stats"), b.text("play-stats")
    driver.set_window_size(1280, 1500)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    driver.save_screenshot(f"{shots}/dashboard-desktop.png")
    b.fits_a_phone()
    driver.save_screenshot(f"{shots}/dashboard-phone.png")
    b.desktop()

    # The same question held to a JSON schema: the answer is JSON of that shape.
    driver.find_element(By.CSS_SELECTOR, "#play details summary").click()
    schema = {
        "type": "object",
        "properties": {"harbour": {"enum": ["Rotterdam", "Hamburg", "Antwerp"]}},
        "required": ["harbour"],
        "additionalProperties": False,
    }
    driver.find_element(By.ID, "play-schema").send_keys(json.dumps(schema))
    driver.find_element(By.ID, "play-max").clear()
    driver.find_element(By.ID, "play-max").send_keys("40")
    driver.find_element(By.ID, "play-send").click()
    b.wait_for("answering in JSON", lambda: "tokens/s" in b.text("play-stats") and b.text("play-answer") != answer, 60)
    shaped = json.loads(b.text("play-answer"))
    assert shaped["harbour"] in schema["properties"]["harbour"]["enum"], shaped

    # An admin key: the model buttons, each key's and each model's usage, the deployments.
    b.forget_key()
    b.use_key(admin_key)
    b.wait_for("showing the unload button", lambda: driver.find_element(By.CSS_SELECTOR, model_button("unload", MODEL)))
    b.wait_for("showing usage by key", lambda: "ops" in b.text("usage") and "7 days" in b.text("usage"))
    b.choose("usage-by", "model")
    b.wait_for("showing usage by model", lambda: "smollm2" in b.text("usage") and "ops" not in b.text("usage"))

    # The deployment `chat` rolling out to v2 at 10%: stepped, promoted and rolled back from the page.
    b.wait_for("showing the rollout and its guards", lambda: "canary" in b.text("deployments") and "errors ≤ 50.0%" in b.text("deployments"))
    assert " 10%" in b.text("deployments"), b.text("deployments")
    b.click("#deployments button[data-action='step']")
    b.wait_for("stepping the canary to 50%", lambda: " 50%" in b.text("deployments") and " 90%" not in b.text("deployments"))
    b.click("#deployments button[data-action='promote']")
    b.wait_for("promoting the canary", lambda: "chat" in b.text("deployments") and "canary" not in b.text("deployments"))
    stable = lambda: driver.execute_script("return document.querySelector('#deployments tbody td:nth-child(2)').textContent")
    assert "smollm2:v2" in stable(), f"the stable version after promoting: {stable()!r}"
    b.click("#deployments button[data-action='rollback']")
    b.wait_for("rolling back to v1", lambda: "smollm2:v1" in stable())
    b.wait_for("showing TTFT percentiles", lambda: "ms" in b.text("now-ttft"))

    # Models: smollm2 unloaded; the spare copy loaded from the page, pinned and unpinned.
    b.click(model_button("unload", MODEL))
    b.wait_for("unloading the model", lambda: "on disk" in " ".join(model_row(MODEL)))
    b.click(model_button("load", SPARE))
    b.wait_for("loading the spare copy", lambda: model_row(SPARE)[2:3] == ["ready"], timeout=60)
    b.click(model_button("pin", SPARE))
    b.wait_for("pinning it", lambda: "never (pinned)" in model_row(SPARE))
    b.click(model_button("unpin", SPARE))
    b.wait_for("unpinning it", lambda: model_row(SPARE)[8:9] and model_row(SPARE)[8].startswith("in "))

    errors = b.console_errors()
    assert not errors, f"console errors: {errors}"
    print(f"dashboard: key asked and checked, burst counted, one model's history shown, playground answered "
          f"{len(answer)} characters ({b.text('play-stats')}) and JSON {shaped}, usage by key and by model, "
          "a rollout stepped, promoted and rolled back, a model unloaded and one loaded, pinned and unpinned, "
          "no console errors")
finally:
    b.quit()
