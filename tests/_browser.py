"""Run the app under ``bokeh serve`` and drive it in headless Chromium.

Test tooling (not part of the runtime package): shared by the browser tests, bench/app.py,
bench/sessions.py and src/screenshot.py. Needs Debian's
``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``) and
the ``selenium`` package; selenium-manager is never asked to download anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or ``None`` when either is not installed."""
    browser = next((p for p in CHROMIUM_CANDIDATES if os.path.exists(p)), None)
    driver = next((p for p in CHROMEDRIVER_CANDIDATES if os.path.exists(p)), None)
    if browser is None or driver is None:
        return None
    return browser, driver


def output_dir() -> Path:
    """The browser tests' output folder (screenshots): ``$EXPLORER_BROWSER_OUT`` or
    ``build/browser/`` of the repository (ignored by git); created if needed."""
    out = Path(os.environ.get("EXPLORER_BROWSER_OUT") or Path(__file__).resolve().parents[1] / "build" / "browser")
    out.mkdir(parents=True, exist_ok=True)
    return out


def set_viewport(drv: Any, width: int, height: int) -> None:
    """Make the page's viewport exactly ``width`` x ``height`` CSS pixels (the window's
    size includes the browser's own bars)."""
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    app_dir: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
    warm_up: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start ``bokeh serve APP --args CSV`` on a free port and wait until the app answers.

    Returns ``(process, app URL)``; the caller stops the process (tests may SIGKILL it).
    The server's output goes to ``process.log`` (a temporary file). ``warm_up=False`` skips
    the app's background numba warm-up (app_hooks.py) so short-lived servers stay light.
    ``env``: extra environment variables for the server (e.g. ``EXPLORER_IMAGE_MAP_ABOVE``).
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "bokeh", "serve", str(app_dir), "--port", str(port),
        "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
        *extra_args,
    ]  # fmt: skip
    if csv is not None:
        cmd += ["--args", str(csv)]
    log = tempfile.TemporaryFile()
    env = {**os.environ, **(env or {})}
    if not warm_up:
        env["EXPLORER_NO_WARMUP"] = "1"
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}/{Path(app_dir).resolve().name}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"bokeh serve exited ({proc.returncode}):\n{log.read().decode(errors='replace')}")
            try:
                # a big project's first page can take a while: wait for it rather than
                # abandon it and start yet another session
                with urllib.request.urlopen(url, timeout=max(5.0, deadline - time.monotonic())) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bokeh serve did not answer at {url} within {timeout:.0f}s")
            time.sleep(0.2)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server from :func:`launch` (kill it if it does not stop in 10 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = getattr(proc, "log", None)
    if log is not None:
        log.close()


@contextlib.contextmanager
def serve(
    app_dir: str | os.PathLike,
    csv: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run ``bokeh serve APP --args CSV`` on a free port; yield the app URL.

    Polls until the app answers; always stops the server. ``app_dir``/``csv`` are passed
    as given (relative paths resolve against ``cwd``).
    """
    proc, url = launch(app_dir, csv, cwd=cwd, timeout=timeout, extra_args=extra_args, env=env)
    try:
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def chromium(
    download_dir: str | os.PathLike | None = None,
    width: int = 1400,
    height: int = 1300,
    extra_flags: Sequence[str] = (),
) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile; downloads go to ``download_dir``."""
    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    browser, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}",
        *extra_flags,
    ):  # fmt: skip
        opts.add_argument(flag)
    if download_dir is not None:
        opts.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(Path(download_dir).resolve()),
                "download.prompt_for_download": False,
                "profile.default_content_setting_values.automatic_downloads": 1,
                "safebrowsing.enabled": False,
            },
        )
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium-manager is never run
    service = Service(executable_path=driver_path)
    drv = webdriver.Chrome(service=service, options=opts)
    try:
        if download_dir is not None:
            with contextlib.suppress(Exception):
                drv.execute_cdp_cmd(
                    "Browser.setDownloadBehavior",
                    {"behavior": "allow", "downloadPath": str(Path(download_dir).resolve())},
                )
        yield drv
    finally:
        with contextlib.suppress(Exception):
            drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- page helpers
#: JavaScript returning the Bokeh model named arguments[0] of the page's document
FIND_MODEL_JS = """
const docs = window.Bokeh && Bokeh.documents;
if (!docs || !docs.length) return null;
return docs[0].get_model_by_name(arguments[0]) ? true : null;
"""


#: wait_for's loop, run in the page: the predicate is tried every ``poll`` ms with no
#: WebDriver round trip per try (each costs the test, chromedriver and the browser CPU time:
#: about 0.1 CPU s per second of waiting at 50 ms); its last value or error comes back on time-out
_WAIT_JS = """
const done = arguments[arguments.length - 1];
const pollMs = arguments[arguments.length - 2], timeoutMs = arguments[arguments.length - 3];
const args = Array.prototype.slice.call(arguments, 0, arguments.length - 3);
const predicate = function () {
/*PREDICATE*/
};
// truthy as Python sees the value that comes back (an empty list or object is not)
const truthy = (v) => !(v === null || v === undefined || v === false || v === 0 || v === ""
  || Number.isNaN(v) || (Array.isArray(v) && v.length === 0)
  || (v.constructor === Object && Object.keys(v).length === 0));
const t0 = Date.now();
let last = null;
(function tick() {
  let failed = false;  // the page is not ready yet: try again
  try { last = predicate.apply(null, args); } catch (e) { last = "error: " + e; failed = true; }
  if (!failed && truthy(last)) { done({ok: true, value: last}); return; }
  if (Date.now() - t0 > timeoutMs) { done({ok: false, last: last}); return; }
  setTimeout(tick, pollMs);
})();
"""


def wait_for(drv: Any, predicate_js: str, *args: Any, timeout: float = 20.0, poll: float = 0.05) -> Any:
    """Run ``predicate_js`` (a function body returning a value; ``arguments[i]`` are
    ``args``) in the page until it returns truthy, and return that value. The loop runs in
    the page (:data:`_WAIT_JS`); a page that reloads meanwhile starts it again."""
    script = _WAIT_JS.replace("/*PREDICATE*/", predicate_js)
    deadline = time.monotonic() + timeout
    last: Any = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            drv.set_script_timeout(left + 10)
            res = drv.execute_async_script(script, *args, int(left * 1000), int(poll * 1000))
        except Exception as exc:  # the page navigated or is still loading: try again
            last = exc
            time.sleep(poll)
            continue
        if res and res.get("ok"):
            return res["value"]
        last = res.get("last") if res else res
        break
    raise TimeoutError(f"timed out waiting for: {predicate_js.strip()[:120]} (last: {last!r})")


def wait_model(drv: Any, name: str, expr: str, timeout: float = 15.0) -> Any:
    """:func:`wait_for` ``expr`` (with ``m`` bound to the model named ``name``) to be truthy."""
    js = ("const m = Bokeh.documents[0].get_model_by_name(arguments[0]);"
          f"if (!m) return null; return ({expr});")
    return wait_for(drv, js, name, timeout=timeout)


def model_value(drv: Any, name: str, expr: str) -> Any:
    """Evaluate ``expr`` with ``m`` bound to the model named ``name`` in the page."""
    return drv.execute_script(
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]); if (!m) return null; return " + expr + ";",
        name,
    )


PLOT_DRAWN_JS = """
const docs = window.Bokeh && Bokeh.documents;
if (!docs || !docs.length) return false;
const doc = docs[0];
const plot = doc.get_model_by_name("plot");
if (!plot) return false;
const views = Bokeh.index;
const pv = views.find_one(plot);
if (!pv) return false;
if (pv.is_idle === false) return false;
if (!pv.has_finished()) return false;
const rvs = [...pv.renderer_views.values()];
const rv = rvs.find(v => v.model.name === "scatter");
if (rv != null && rv.model.visible && rv.glyph != null && rv.glyph.data_size > 0) return true;
// a big map is one server-rendered image: drawn when it holds every point
const iv = rvs.find(v => v.model.name === "map_image");
if (iv == null || !iv.model.visible || iv.glyph == null || iv.glyph.data_size == 0) return false;
const d = iv.model.data_source.data;
return d.n.length > 0 && d.n[0] === d.total[0];
"""


def plot_canvas_rect(drv: Any) -> dict[str, float]:
    """Page rectangle (left, top, width, height) of the plot's data frame."""
    return drv.execute_script(
        """
const plot = Bokeh.documents[0].get_model_by_name("plot");
const pv = Bokeh.index.find_one(plot);
const canvas = pv.canvas_view.el.getBoundingClientRect();
const f = pv.frame.bbox;
return {left: canvas.left + f.left, top: canvas.top + f.top, width: f.width, height: f.height};
"""
    )


def data_to_page(drv: Any, x: float, y: float) -> tuple[float, float]:
    """Page coordinates (CSS px) of data point (x, y) on the plot."""
    return tuple(
        drv.execute_script(
            """
const plot = Bokeh.documents[0].get_model_by_name("plot");
const pv = Bokeh.index.find_one(plot);
const canvas = pv.canvas_view.el.getBoundingClientRect();
const sx = pv.frame.x_scale.compute(arguments[0]);
const sy = pv.frame.y_scale.compute(arguments[1]);
return [canvas.left + sx, canvas.top + sy];
""",
            x,
            y,
        )
    )


def lasso(drv: Any, points: Sequence[tuple[float, float]], steps: int = 6, shift: bool = False) -> None:
    """Drag a lasso through data points ``points`` (closed automatically) with real mouse
    moves on the plot canvas (the lasso tool must be the active drag tool); ``shift``
    holds the Shift key down meanwhile (append to the selection)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.actions import interaction

    r = plot_canvas_rect(drv)
    lo_x, hi_x = r["left"] + 3, r["left"] + r["width"] - 3
    lo_y, hi_y = r["top"] + 3, r["top"] + r["height"] - 3
    page = [
        (min(max(px, lo_x), hi_x), min(max(py, lo_y), hi_y))
        for px, py in (data_to_page(drv, x, y) for x, y in points)
    ]
    page.append(page[0])
    mouse = PointerInput(interaction.POINTER_MOUSE, "mouse")
    builder = ActionBuilder(drv, mouse=mouse, duration=10)
    px, py = page[0]
    builder.pointer_action.move_to_location(int(px), int(py))
    builder.pointer_action.pointer_down()
    ticks = 2
    for (ax, ay), (bx, by) in zip(page[:-1], page[1:]):
        for k in range(1, steps + 1):
            t = k / steps
            builder.pointer_action.move_to_location(int(ax + (bx - ax) * t), int(ay + (by - ay) * t))
            ticks += 1
    builder.pointer_action.pointer_up()
    if shift:  # one key action per pointer action (tick): Shift is held from the first to the last
        from selenium.webdriver.common.keys import Keys

        builder.key_action.key_down(Keys.SHIFT)
        for _ in range(ticks):
            builder.key_action.pause(0)
        builder.key_action.key_up(Keys.SHIFT)
    builder.perform()
    ActionChains(drv).reset_actions()


def set_model(drv: Any, name: str, prop: str, value: Any) -> None:
    """Set a property of the model named ``name`` in the page (synced to the server like a
    person's edit)."""
    drv.execute_script(
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]); m[arguments[1]] = arguments[2];",
        name, prop, value,
    )  # fmt: skip


def click_button(drv: Any, name: str) -> None:
    """A real mouse click on the Bokeh Button named ``name`` (inside its shadow DOM)."""
    el = drv.execute_script(
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]);"
        "const v = Bokeh.index.find_one(m); const r = v.el.shadowRoot || v.el;"
        "const b = r.querySelector('button'); b.scrollIntoView({block: 'center'}); return b;",
        name,
    )
    el.click()
