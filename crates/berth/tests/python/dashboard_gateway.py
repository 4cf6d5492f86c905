"""The dashboard on `berth gateway`, in a real browser (Debian's chromium, headless).

    dashboard_gateway.py GATEWAY_PORT REPLICA_URL ADMIN_KEY INFERENCE_KEY SCREENSHOT_DIR

The gateway's page asks for the gateway's key, shows its replicas (health, load, models) instead of
one server's models, counts and draws the requests sent through it (of all replicas, and of the one
chosen), streams a playground answer through it, shows an admin key the usage the gateway recorded,
fits a phone, and logs no console errors. A desktop screenshot goes to SCREENSHOT_DIR.
"""

import sys
import threading
import time

from browser import Browser, By, post

port, replica, admin_key, inference_key, shots = sys.argv[1:6]
base = f"http://127.0.0.1:{port}"


def complete(n):
    for _ in range(n):
        post(base, "/v1/completions", {"model": "smollm2", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}, inference_key)


b = Browser("gateway dashboard")
driver = b.driver
try:
    driver.get(base + "/ui")
    b.wait_for("saying it needs a key", lambda: "needs an API key" in b.text("status"))
    b.use_key(inference_key)
    b.wait_for("showing the replica up", lambda: replica in b.text("replicas") and " up " in f" {b.text('replicas')} ")
    assert not driver.find_element(By.ID, "models-section").is_displayed(), "a gateway has replicas, not models"
    assert not driver.find_element(By.ID, "figure-itl").is_displayed(), "nor the time between tokens"
    assert "smollm2" in b.text("replicas"), b.text("replicas")

    burst = threading.Thread(target=complete, args=(8,))
    burst.start()
    b.wait_for("counting the burst", lambda: int(b.text("total-requests") or 0) >= 4, timeout=60)
    burst.join()
    b.wait_for("counting every request", lambda: int(b.text("total-requests") or 0) >= 8, timeout=30)
    b.wait_for("drawing the requests line", lambda: b.chart_pixels("chart-requests") > 30, timeout=30)
    b.wait_for("drawing the replica's tokens", lambda: b.chart_pixels("chart-tokens") > 30, timeout=30)
    b.wait_for("showing when answers start", lambda: "ms" in b.text("now-ttft"))
    b.choose("chart-of", replica)
    b.wait_for("showing the replica's own history", lambda: int(b.text("total-requests") or 0) >= 8)

    b.wait_for("listing the replicas' models", lambda: "smollm2" in b.text("play-model"))
    driver.find_element(By.ID, "play-max").clear()
    driver.find_element(By.ID, "play-max").send_keys("16")
    driver.find_element(By.ID, "play-prompt").send_keys("Name a harbour.")
    driver.find_element(By.ID, "play-send").click()
    b.wait_for("streaming an answer through the gateway", lambda: "tokens/s" in b.text("play-stats"), 60, show="play-stats")
    answer = b.text("play-answer")
    assert answer and "error" not in b.text("play-stats"), (answer, b.text("play-stats"))

    b.forget_key()
    b.use_key(admin_key)
    b.wait_for("showing the usage recorded at the gateway", lambda: "viewer" in b.text("usage"))
    driver.set_window_size(1280, 1300)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    driver.save_screenshot(f"{shots}/dashboard-gateway.png")
    b.fits_a_phone()
    b.desktop()
    errors = b.console_errors()
    assert not errors, f"console errors: {errors}"
    print(f"gateway dashboard: replica shown up, {b.text('total-requests')} requests counted, "
          f"playground answered through the gateway ({b.text('play-stats')}), usage by key, no console errors")
finally:
    b.quit()
