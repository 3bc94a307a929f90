"""ComfyUI's official front end, served by a real daemon, driven in headless Chromium.

Starts `fluxlora serve` (FLUXLORA_BIN, or target/debug/fluxlora of this checkout)
on a free port with a fresh data dir, the built-in tiny model and the front end
in FLUXLORA_FRONTEND (scripts/browser-test.sh fetches it with
scripts/get-frontend.sh), opens the editor in Chromium through chromedriver
(Debian's chromium and chromium-driver; CHROMIUM and CHROMEDRIVER name others)
and checks what a user sees: the editor boots without console errors caused by
the daemon's answers, our nodes are in the node library, the example graph
loads and runs from the Run button, the Train node's progress and loss chart
(js/, read through its test hook window.fluxlora) move, and the Save Image node
shows the sampled image.

Screenshots go to FLUXLORA_BROWSER_ARTIFACTS when set (a finished graph always,
one per failing test), else to the test's temporary folder, which is then kept
when a test fails; their paths are printed.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "comfyui", "train_and_sample.json")
TRAIN_NODE = "3"
SAVE_NODE = "6"
BOOT_TIMEOUT_S = 120
RUN_TIMEOUT_S = float(os.environ.get("FLUXLORA_BROWSER_RUN_TIMEOUT", "600"))

# Console lines that are not the daemon's doing, each with the reason. A SEVERE
# entry that matches none of these fails the test.
IGNORED_CONSOLE = [
    # Requests to hosts other than the daemon (the front end checks comfy.org
    # for releases and news; CI machines are often offline). Matched by the
    # entry's URL, see foreign_url().
    ("another host", lambda entry, base: foreign_url(entry["message"], base)),
    # Files a fresh ComfyUI install answers 404 for too; the front end reads a
    # 404 as "absent": the user's stylesheets, the saved node templates and
    # the workflow bookmarks.
    (
        "absent user file",
        lambda entry, base: "status of 404" in entry["message"]
        and any(
            entry["message"].startswith(base + path)
            for path in (
                "/user.css",
                "/api/userdata/user.css",
                "/api/userdata/comfy.templates.json",
                "/api/userdata/workflows%2F.index.json",
            )
        ),
    ),
    # Listing a user folder that does not exist yet: ComfyUI answers 404 as
    # well, and the front end reads that as an empty folder (a fresh data dir
    # has no saved workflows or subgraphs).
    (
        "user folder not made yet",
        lambda entry, base: "status of 404" in entry["message"]
        and any(
            entry["message"].startswith(f"{base}/api/userdata?dir={folder}&")
            for folder in ("workflows", "subgraphs")
        ),
    ),
]


def foreign_url(message, base):
    """Whether the console entry is about a URL on a host other than the daemon."""
    url = message.split(" ", 1)[0]
    return url.startswith(("http://", "https://", "ws://", "wss://")) and not url.startswith(
        (base, base.replace("http", "ws", 1))
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def daemon_binary():
    binary = os.environ.get("FLUXLORA_BIN") or os.path.join(REPO, "target", "debug", "fluxlora")
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"no daemon binary at {binary} (cargo build --bin fluxlora, or set FLUXLORA_BIN)")
    return binary


def frontend_dir():
    folder = os.environ.get("FLUXLORA_FRONTEND", "")
    if not os.path.isfile(os.path.join(folder, "index.html")):
        raise RuntimeError(
            f"FLUXLORA_FRONTEND={folder!r} holds no index.html (scripts/get-frontend.sh DIR fetches one)"
        )
    return folder


class Daemon:
    """`fluxlora serve` on a free port with its own data dir, logging to a file."""

    def __init__(self, work, token=None):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(work, "daemon.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                daemon_binary(),
                "serve",
                "--port",
                str(port),
                "--data-dir",
                os.path.join(work, "data"),
                "--comfy-frontend",
                frontend_dir(),
            ]
            + (["--token", token] if token else []),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        probe = self.url + "/system_stats" + (f"?token={token}" if token else "")
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(probe)
                return
            except (OSError, ValueError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the daemon did not come up:\n{self.log()}")
                time.sleep(0.2)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-6000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_browser():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1920,1080",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(60)
    return driver


# Runs in the page after boot: records the front end's execution events for
# the test (through the same api object extensions use).
RECORD_EVENTS = """
const api = window.comfyAPI.api.api;
window.__browserTest = {events: [], steps: []};
for (const type of ['execution_start', 'executing', 'executed', 'execution_success',
                    'execution_error', 'execution_interrupted', 'fluxlora.train']) {
  api.addEventListener(type, (e) => window.__browserTest.events.push({type, detail: e.detail}));
}
"""

# Samples the Train node's state from js/'s test hook every 20 ms, so a fast
# run still shows every distinct step it went through.
SAMPLE_PROGRESS = """
const node = arguments[0];
window.__browserTest.sampler = setInterval(() => {
  const state = window.fluxlora && window.fluxlora.nodes && window.fluxlora.nodes[node];
  if (!state || typeof state.step !== 'number') return;
  const steps = window.__browserTest.steps;
  const last = steps[steps.length - 1];
  if (!last || last.step !== state.step || last.total !== state.total) {
    steps.push({step: state.step, total: state.total, chartDrawn: state.chartDrawn});
  }
}, 20);
"""


def wait_for_boot(driver):
    """Waits until the editor is up and its /ws has given it a client id."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while not driver.execute_script(
        "return !!(window.app && window.app.graph && window.app.canvas && window.comfyAPI"
        " && window.comfyAPI.api.api.clientId)"
    ):
        if time.monotonic() > deadline:
            raise AssertionError(f"the editor did not boot in {BOOT_TIMEOUT_S} s")
        time.sleep(0.25)


class FrontendTest(unittest.TestCase):
    """One daemon and one browser page for the class; each test checks the console it caused."""

    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="fluxlora-browser-")
        cls.artifacts = os.environ.get("FLUXLORA_BROWSER_ARTIFACTS") or cls.work
        os.makedirs(cls.artifacts, exist_ok=True)
        cls.failed = False
        cls.daemon = Daemon(cls.work)
        try:
            cls.driver = start_browser()
        except Exception:
            cls.daemon.stop()
            raise
        cls.console = []
        try:
            cls.driver.get(cls.daemon.url + "/")
            cls.boot_error = None
            cls.wait_for_boot()
        except Exception as error:  # reported by each test, with a screenshot
            cls.boot_error = error

    @classmethod
    def wait_for_boot(cls):
        wait_for_boot(cls.driver)
        cls.driver.execute_script(RECORD_EVENTS)

    @classmethod
    def tearDownClass(cls):
        with contextlib.suppress(WebDriverException):
            cls.console.extend(cls.driver.get_log("browser"))
        with open(os.path.join(cls.artifacts, "console.json"), "w") as f:
            json.dump(cls.console, f, indent=1)
        for reason, ignore in IGNORED_CONSOLE:
            count = sum(e["level"] == "SEVERE" and ignore(e, cls.daemon.url) for e in cls.console)
            if count:
                print(f"ignored {count} console error(s): {reason}", file=sys.stderr)
        with contextlib.suppress(WebDriverException):
            cls.driver.quit()
        cls.daemon.stop()
        if cls.failed:
            log = os.path.join(cls.artifacts, "daemon.log")
            if log != cls.daemon.log_path:
                shutil.copyfile(cls.daemon.log_path, log)
            print(f"\nthe daemon's log: {log}", file=sys.stderr)
        if cls.artifacts != cls.work or not cls.failed:
            shutil.rmtree(cls.work, ignore_errors=True)
        else:
            print(f"kept {cls.work}", file=sys.stderr)

    def setUp(self):
        if self.boot_error is not None:
            self.fail_with_screenshot(f"the editor did not boot: {self.boot_error}")

    @contextlib.contextmanager
    def screenshot_on_failure(self):
        try:
            yield
        except BaseException:
            self.screenshot(f"failure-{self._testMethodName}.png")
            type(self).failed = True
            raise

    def fail_with_screenshot(self, message):
        with self.screenshot_on_failure():
            self.fail(message)

    def screenshot(self, name):
        path = os.path.join(self.artifacts, name)
        with contextlib.suppress(WebDriverException):
            self.driver.save_screenshot(path)
            print(f"\nscreenshot: {path}", file=sys.stderr)
        return path

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def new_console_errors(self):
        """SEVERE browser console entries since the last call, less the ignored ones."""
        entries = self.driver.get_log("browser")
        type(self).console.extend(entries)
        return [
            entry
            for entry in entries
            if entry["level"] == "SEVERE"
            and not any(ignore(entry, self.daemon.url) for _, ignore in IGNORED_CONSOLE)
        ]

    def assert_console_clean(self):
        """No console errors since the last check (asserted last, after the other checks)."""
        errors = self.new_console_errors()
        if errors:
            self.fail("console errors:\n" + "\n".join(e["message"] for e in errors))

    def dismiss_dialogs(self):
        """Closes what the front end opens over the graph on a first visit (templates, tips)."""
        for _ in range(5):
            if not [d for d in self.driver.find_elements(By.CSS_SELECTOR, '[role="dialog"]') if d.is_displayed()]:
                return
            self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            time.sleep(0.5)
        self.fail("a dialog over the graph does not close")

    def test_editor_boots_with_our_nodes_in_the_library(self):
        with self.screenshot_on_failure():
            expected = get_json(self.daemon.url + "/api/object_info")
            for name in ("FluxLoraTrain", "FluxLoraSample", "FluxLoraDataset", "FluxLoraApply", "SaveImage"):
                self.assertIn(name, expected)
            self.assertEqual("Train Flux LoRA", expected["FluxLoraTrain"]["display_name"])
            registered = self.js(
                """
                const out = {};
                for (const [type, node] of Object.entries(LiteGraph.registered_node_types)) {
                  out[type] = {title: node.title, category: node.category};
                }
                return out;
                """
            )
            for name, definition in expected.items():
                self.assertIn(name, registered, f"{name} is not in the node library")
                self.assertEqual(definition["display_name"], registered[name]["title"], name)
                self.assertEqual(definition["category"], registered[name]["category"], name)
            self.assert_console_clean()

    def test_example_graph_trains_and_samples_from_the_run_button(self):
        with self.screenshot_on_failure():
            with open(EXAMPLE) as f:
                example = json.load(f)
            self.dismiss_dialogs()
            self.driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "window.app.loadApiJson(arguments[0], 'train_and_sample.json')"
                ".then(() => done(null), (e) => done(String(e)))",
                example,
            )
            loaded = self.js(
                "return window.app.graph.nodes.map((n) => ({id: String(n.id), type: n.type,"
                " widgets: Object.fromEntries((n.widgets || []).map((w) => [w.name, w.value]))}))"
            )
            self.assertEqual(
                sorted((id, node["class_type"]) for id, node in example.items()),
                sorted((n["id"], n["type"]) for n in loaded),
            )
            # The whole graph in view, drawn in full even when zoomed out (LiteGraph
            # loads a node's images when it draws the node; the screenshot shows text).
            self.driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0)"
                ".then(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'))"
                ".then(() => done(null), (e) => done(String(e)))"
            )
            train = next(n for n in loaded if n["id"] == TRAIN_NODE)
            self.assertEqual(example[TRAIN_NODE]["inputs"]["max_train_steps"], train["widgets"]["max_train_steps"])

            self.js(SAMPLE_PROGRESS, TRAIN_NODE)
            self.dismiss_dialogs()
            button = WebDriverWait(self.driver, 20).until(
                expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, '[data-testid="queue-button"]'))
            )
            button.click()

            prompt_id = self.wait_for_end()
            job = get_json(f"{self.daemon.url}/api/jobs/{prompt_id}")
            self.assertEqual("completed", job["status"], job)
            # The UI queued it: the prompt carries the editor's own graph.
            workflow = job["workflow"]["extra_data"]["extra_pnginfo"]["workflow"]
            self.assertEqual(len(example), len(workflow["nodes"]))

            self.check_training_progress(example[TRAIN_NODE]["inputs"]["max_train_steps"])
            self.check_saved_image()
            self.screenshot("finished.png")
            self.assert_console_clean()

    def wait_for_end(self):
        """The prompt id of the run the button queued, once it succeeded."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            events = self.js("return window.__browserTest.events")
            for event in events:
                if event["type"] in ("execution_error", "execution_interrupted"):
                    self.fail(f"the run failed: {json.dumps(event['detail'])[:2000]}\n{self.daemon.log()}")
                if event["type"] == "execution_success":
                    return event["detail"]["prompt_id"]
            if time.monotonic() > deadline:
                types = sorted({e["type"] for e in events})
                self.fail(f"no execution_success in {RUN_TIMEOUT_S} s (events seen: {types})")
            time.sleep(0.25)

    def check_training_progress(self, max_steps):
        self.js("clearInterval(window.__browserTest.sampler)")
        steps = self.js("return window.__browserTest.steps")
        final = self.js("return window.fluxlora && window.fluxlora.nodes[arguments[0]]", TRAIN_NODE)
        self.assertIsNotNone(final, "js/ shows no state for the Train node (window.fluxlora.nodes['3'])")
        seen = [s["step"] for s in steps]
        self.assertEqual(sorted(seen), seen, f"the step went back: {seen}")
        self.assertGreater(len(set(seen)), 1, f"the step did not rise: {seen}")
        self.assertEqual(max_steps, final["step"], final)
        self.assertEqual(max_steps, final["total"], final)
        self.assertGreater(len(final["losses"]), 1, final)
        self.assertGreater(final["chartDrawn"], 0, "the loss chart was never drawn")
        # The run's samples (sample_every_n_steps) reached the node.
        self.assertTrue(final["previewUrl"], f"no sample image on the Train node: {final}")

    def check_saved_image(self):
        deadline = time.monotonic() + 30
        while True:
            shown = self.js(
                """
                const outputs = window.app.nodeOutputs[arguments[0]];
                const node = window.app.graph.getNodeById(Number(arguments[0]));
                const img = node && node.imgs && node.imgs[0];
                return {
                  images: (outputs && outputs.images) || [],
                  src: img ? img.src : null,
                  width: img ? img.naturalWidth : 0,
                  views: performance.getEntriesByType('resource')
                    .map((e) => e.name).filter((u) => u.includes('/api/view')),
                };
                """,
                SAVE_NODE,
            )
            if shown["width"] > 0:
                break
            if time.monotonic() > deadline:
                self.fail(f"the Save Image node shows no image: {shown}")
            time.sleep(0.25)
        self.assertEqual(1, len(shown["images"]), shown)
        self.assertEqual("output", shown["images"][0]["type"], shown)
        self.assertIn("/api/view?", shown["src"])
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(shown["src"]).query)
        self.assertEqual([shown["images"][0]["filename"]], query["filename"])
        self.assertTrue(shown["views"], "no request for /api/view")
        with urllib.request.urlopen(shown["src"], timeout=10) as response:
            self.assertEqual("image/png", response.headers.get_content_type())
            self.assertEqual(b"\x89PNG", response.read(4))


if __name__ == "__main__":
    unittest.main()


class TokenFrontendTest(unittest.TestCase):
    """The front end of a daemon with a token: opened once with ?token=, the
    page runs on the session cookie alone (its fetches, /ws, /view image URLs
    and static files), scripts cannot read the cookie, and nothing else gets in."""

    TOKEN = "browser-test-t0ken-" + str(os.getpid())

    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.mkdtemp(prefix="fluxlora-browser-token-")
        cls.daemon = Daemon(cls.work, token=cls.TOKEN)
        try:
            cls.driver = start_browser()
        except Exception:
            cls.daemon.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        with contextlib.suppress(WebDriverException):
            cls.driver.quit()
        cls.daemon.stop()
        shutil.rmtree(cls.work, ignore_errors=True)

    def test_the_page_runs_on_the_session_cookie_and_nothing_else_gets_in(self):
        driver = self.driver
        # Without the token the daemon answers 401, to the browser as to scripts.
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(self.daemon.url + "/", timeout=10)
        self.assertEqual(401, refused.exception.code)

        driver.get(self.daemon.url + "/?token=" + self.TOKEN)
        wait_for_boot(driver)
        # The page's own requests carry the cookie; the URL no longer matters.
        driver.execute_script("history.replaceState(null, '', '/')")
        status = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/object_info').then((r) => done(r.status), (e) => done(String(e)))"
        )
        self.assertEqual(200, status)
        # An uploaded image shown through a /view URL, as the editor shows outputs.
        width = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const canvas = document.createElement('canvas');
            canvas.width = 24; canvas.height = 16;
            canvas.toBlob(async (blob) => {
              const form = new FormData();
              form.append('image', blob, 'token-test.png');
              const answer = await (await fetch('/upload/image', {method: 'POST', body: form})).json();
              const img = new Image();
              img.onload = () => done(img.naturalWidth);
              img.onerror = () => done('not loaded');
              img.src = '/view?filename=' + encodeURIComponent(answer.name) + '&type=input';
            }, 'image/png');
            """
        )
        self.assertEqual(24, width)
        # HttpOnly: scripts of the page cannot read the session.
        self.assertNotIn("fluxlora_session", driver.execute_script("return document.cookie"))
        cookies = {c["name"]: c for c in driver.get_cookies()}
        session = next(c for name, c in cookies.items() if name.startswith("fluxlora_session_"))
        self.assertTrue(session["httpOnly"])
        self.assertEqual("Strict", session["sameSite"])
        self.assertNotIn(self.TOKEN, session["value"])
        # A wrong cookie value lets nothing in.
        wrong = urllib.request.Request(
            self.daemon.url + "/api/object_info",
            headers={"Cookie": f"{session['name']}={'0' * len(session['value'])}"},
        )
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=10)
        self.assertEqual(401, refused.exception.code)
        self.assertNotIn(self.TOKEN, self.daemon.log())
