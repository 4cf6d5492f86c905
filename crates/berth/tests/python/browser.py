"""What the dashboard's browser tests share: Debian's chromium, headless, driven by chromedriver, and
the steps every test of the page takes (wait for a state, read an element, give a key, click what
the page may have redrawn, check the console)."""

import json
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

__all__ = ["Browser", "By", "Select", "post"]


def post(base, path, body, key):
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    return json.loads(urllib.request.urlopen(request, timeout=120).read() or b"null")


class Browser:
    def __init__(self, name):
        self.name = name
        options = Options()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

    def quit(self):
        self.driver.quit()

    def text(self, element_id):
        try:
            return self.driver.find_element(By.ID, element_id).text
        except Exception:
            return ""

    def wait_for(self, what, check, timeout=30, show=None):
        """Wait until `check()` holds; on timeout, say what the page shows (and the text of the
        element `show`, if given)."""
        deadline = time.time() + timeout
        while True:
            try:
                result = check()
                if result:
                    return result
            except Exception:  # the page is between states
                pass
            if time.time() > deadline:
                shown = f"; #{show}: {self.text(show)!r}" if show else ""
                raise SystemExit(f"{self.name}: not {what} within {timeout} s; status: {self.text('status')!r}{shown}")
            time.sleep(0.2)

    def use_key(self, key):
        form = self.driver.find_element(By.ID, "key-form")
        self.wait_for("asked for a key", form.is_displayed)
        field = self.driver.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def forget_key(self):
        self.driver.find_element(By.ID, "forget-key").click()

    def click(self, selector):
        """Click what `selector` finds, found again if the page redrew it meanwhile (every 2 s)."""

        def found_and_clicked():
            self.driver.find_element(By.CSS_SELECTOR, selector).click()
            return True

        self.wait_for(f"letting {selector} be clicked", found_and_clicked)

    def choose(self, select_id, value):
        """Pick `value` in a select whose options the page fills in."""

        def chosen():
            Select(self.driver.find_element(By.ID, select_id)).select_by_value(value)
            return True

        self.wait_for(f"offering {value!r} in #{select_id}", chosen)

    def chart_pixels(self, canvas_id):
        """Pixels of a chart's line (drawn in the accent colour; the label is grey)."""
        return self.driver.execute_script(
            f"const c = document.getElementById('{canvas_id}');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > 150 && d[i] < 60) n++;"
            "return n;"
        )

    def fits_a_phone(self):
        """The page is no wider than a 390 CSS pixel phone, as the browser's device emulation makes it."""
        phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
        time.sleep(0.5)
        width = self.driver.execute_script("return document.documentElement.scrollWidth")
        wide = self.driver.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > 392)"
            ".slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"
        )
        assert width <= 392, f"the page is {width} px wide on a 390 px screen: {wide}"

    def desktop(self):
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        self.driver.set_window_size(1280, 1000)

    def console_errors(self):
        """Console errors but the 401s of a keyless first look and of a wrong key."""
        return [
            e for e in self.driver.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]
        ]
