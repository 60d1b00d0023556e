"""What the MLflow UI shows for a finished sweep, seen in a real browser.

``screenshot_mlflow`` starts ``mlflow server`` on a sweep's store, opens its pages in headless
Chromium (driven over the DevTools protocol, as ``tests/rf_cli/test_view.py`` does) and saves a
PNG and the visible text of each: the experiment's runs table (and the table under each view
saved in the experiment), the sweep's parent run (its description links the best trial), the
best trial's run page, its artifacts tab with ``orbit.gif`` and with ``mesh_preview.png``
selected, and the compare view of all trials, also with those two artifacts selected.

    python -m rf_bench.mlflow_ui --tracking-uri sqlite:////tmp/store/mlflow.db \\
        --artifacts /tmp/store/artifacts --experiment quick --out outputs/mlflow_ui

Run it on a copy of a store: the server may migrate the database. The runs' artifact
locations are absolute paths kept in the database, so a copied store still shows the
original's artifacts unless those paths are rewritten too.

MLflow 3.17's UI routes (hash routes under the server's root), found by reading its bundle:
``#/experiments/ID/runs``, ``#/experiments/ID/runs/RUN`` and ``.../RUN/artifacts/PATH``,
``#/compare-runs?runs=[...]&experiments=[...]``. ``?workflowType=machine_learning`` picks the
"Model training" side of the GenAI / Model training switch, which a new browser sets to GenAI
whatever the experiment's ``mlflow.experimentKind`` tag says; ``?viewStateShareKey=KEY`` opens
the view saved as the experiment tag ``mlflow.sharedViewState.KEY``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rf_distributed.tracking import tags as rf_tags

__all__ = ["SAVED_VIEW_TAG", "TEXT_CHARS", "Browser", "Shot", "main", "mlflow_server",
           "screenshot_mlflow", "sweep_runs"]

TEXT_CHARS = 3000
"""Characters of each page's visible text kept."""
SAVED_VIEW_TAG = "mlflow.sharedViewState."
"""Prefix of the experiment tags holding the runs table's saved views (the "Views" menu)."""
SIZE = (1920, 1080)
"""A common desktop screen: wide enough for the run page's two-column layout."""
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader",
                  "--enable-unsafe-swiftshader", "--hide-scrollbars", "--no-first-run",
                  "--remote-debugging-port=0"]
# True once every <img> on the page has decoded (an artifact preview is an <img>), and there
# are at least %d of them in view.
IMAGES_READY = ("(() => {{ const shown = Array.from(document.images).filter(i => "
                "i.getBoundingClientRect().width > 0); return shown.length >= {n} && "
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0); }})()")
# Selects an artifact in an artifact tree (run page or compare page) as a click would.
CLICK_ARTIFACT = ("(() => {{ const node = document.querySelector('[data-testid=\"artifact-tree-"
                  "node\"][artifact-name={name}]'); if (!node) return false; "
                  "node.scrollIntoView({{block: 'center'}}); node.click(); return true; }})()")
# The MLflow Assistant opens itself on a browser's first visit and takes a quarter of the
# width; these keys of the UI's localStorage say it was opened once and closed since.
ASSISTANT_CLOSED = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', "
                    "'true'); localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")


@dataclass
class Shot:
    """One page of the UI as the browser showed it."""

    name: str
    """What the page is, also the PNG's stem: ``runs_table``, ``sweep_run``, ..."""
    url: str
    png: str
    """Where the screenshot was saved."""
    expected: list[str]
    """Text the page was waited for."""
    found: bool
    """Whether all of ``expected`` (and the images waited for) appeared in time."""
    text: str
    """``document.body.innerText``, cut to ``TEXT_CHARS``."""


# ---------------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(condition, seconds: float, every: float = 0.25) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return condition()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, artifacts_root: str, port: int = 0, log: Path | None = None,
                  seconds: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on a store, one worker, on 127.0.0.1; yields its base URL once
    ``/health`` answers. ``port=0`` picks a free one."""
    mlflow = Path(sys.executable).with_name("mlflow")
    if not mlflow.is_file():
        raise FileNotFoundError(f"{mlflow} not found: pip install mlflow in this environment")
    port = port or _free_port()
    sink = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", tracking_uri,
                               "--default-artifact-root", artifacts_root, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        if not _wait_until(lambda: server.poll() is not None or _answers(f"{base}/health"),
                           seconds) or server.poll() is not None:
            raise RuntimeError(f"mlflow server did not answer {base}/health within {seconds:.0f}"
                               f" s (exit code {server.poll()})"
                               + (f"; see {log}" if log else ""))
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if log:
            sink.close()


def _api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of the tracking server's REST API: GET with ``query``, or POST ``body``."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)


def _tags(entity: dict) -> dict[str, str]:
    tags = entity["data"].get("tags", []) if "data" in entity else entity.get("tags", [])
    return {t["key"]: t["value"] for t in tags}


def sweep_runs(base: str, experiment: str) -> tuple[dict, dict, list[dict]]:
    """The experiment (as the REST API gives it), its newest sweep's parent run (tag
    ``rf.kind=sweep``) and that sweep's trial runs, asked of a running server."""
    try:
        exp = _api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    except urllib.error.HTTPError as err:
        raise LookupError(f"no MLflow experiment named {experiment!r} in this store: "
                          "pass the name of the sweep (its `name:` in the sweep YAML)") from err
    runs, token = [], None
    while True:
        page = _api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                          "max_results": 1000, "page_token": token})
        runs += page.get("runs", [])
        if not (token := page.get("next_page_token")):
            break
    sweeps = [r for r in runs if _tags(r).get(rf_tags.KIND) == "sweep"]
    if not sweeps:
        raise LookupError(f"experiment {experiment!r} has no sweep run (tag rf.kind=sweep): "
                          "was it logged by `rf sweep`?")
    parent = max(sweeps, key=lambda r: int(r["info"]["start_time"]))
    trials = [r for r in runs
              if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    return exp, parent, trials


# ---------------------------------------------------------------------------- the browser


def chromium() -> str | None:
    """The chromium binary on PATH, else None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium with one tab, driven over the DevTools protocol."""

    def __init__(self, profile: Path, size: tuple[int, int] = SIZE, seconds: float = 30.0):
        from websockets.sync.client import connect

        binary = chromium()
        if binary is None:
            raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install "
                                    "chromium)")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--window-size={size[0]},{size[1]}",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            active = profile / "DevToolsActivePort"
            if not _wait_until(active.is_file, seconds):
                raise RuntimeError("chromium did not start its DevTools server")
            port = active.read_text().split()[0]
            new = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank",
                                         method="PUT")
            with urllib.request.urlopen(new, timeout=30) as reply:
                target = json.load(reply)["webSocketDebuggerUrl"]
            self.page = connect(target, max_size=None)
        except BaseException:
            self.close()
            raise
        self._ids = iter(range(1, 1_000_000_000))
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        n = next(self._ids)
        self.page.send(json.dumps({"id": n, "method": method, "params": params}))
        while (reply := json.loads(self.page.recv(timeout=60))).get("id") != n:
            pass  # an event
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError("JavaScript error: " + details.get("exception", {}).get(
                "description", details.get("text", "")))
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def navigate(self, url: str) -> None:
        """Load ``url`` afresh (a hash route too: through about:blank)."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def wait(self, expected: list[str], seconds: float = 60.0, images: int = 0,
             settle: float = 2.0) -> bool:
        """Wait until the page holds every ``expected`` string and ``images`` decoded images
        in view, and its text has not changed for ``settle`` seconds. False if ``seconds`` ran
        out first."""
        end = time.monotonic() + seconds
        last, since, ready = None, time.monotonic(), False
        while time.monotonic() < end:
            text = self.text()
            ready = (all(s in text for s in expected)
                     and self.evaluate("document.readyState") == "complete"
                     and self.evaluate(IMAGES_READY.format(n=images)))
            if text != last:
                last, since = text, time.monotonic()
            elif ready and time.monotonic() - since >= settle:
                return True
            time.sleep(0.5)
        return bool(ready)

    def screenshot(self, path: Path) -> None:
        png = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(png))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.page.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------------------- the pages


@dataclass
class _Page:
    name: str
    url: str
    expected: list[str]
    click: str | None = None
    """An artifact to select in the page's artifact tree once it has loaded."""
    images: int = 0


def _pages(base: str, exp: dict, parent: dict, trials: list[dict], workflow_type: str | None
           ) -> list[_Page]:
    """Every page to screenshot."""
    exp_id = exp["experiment_id"]
    root = f"{base}/#/experiments/{exp_id}"

    def query(**params) -> str:
        params |= {"workflowType": workflow_type} if workflow_type else {}
        return "?" + urllib.parse.urlencode(params) if params else ""

    parent_id, parent_name = parent["info"]["run_id"], parent["info"]["run_name"]
    pages = [_Page("runs_table", f"{root}/runs{query()}", [parent_name])]
    for key in sorted(k[len(SAVED_VIEW_TAG):] for k in _tags(exp) if k.startswith(
            SAVED_VIEW_TAG)):
        pages.append(_Page(f"runs_view_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}",
                           f"{root}/runs{query(viewStateShareKey=key)}", [parent_name]))
    pages.append(_Page("sweep_run", f"{root}/runs/{parent_id}{query()}",
                       [parent_name, "Best trial"]))
    best = _tags(parent).get(rf_tags.BEST_RUN_ID)
    by_id = {t["info"]["run_id"]: t for t in trials}
    if best in by_id:
        best_name = by_id[best]["info"]["run_name"]
        pages += [_Page("best_run", f"{root}/runs/{best}{query()}", [best_name])]
        pages += [_Page(f"best_run_{Path(a).stem}_{Path(a).suffix[1:]}",
                        f"{root}/runs/{best}/artifacts/{a}{query()}", [best_name, a], images=1)
                  for a in ("orbit.gif", "mesh_preview.png")]
    if trials:
        names = sorted(t["info"]["run_name"] for t in trials)
        compare = f"{base}/#/compare-runs" + query(
            runs=json.dumps([t["info"]["run_id"] for t in trials]),
            experiments=json.dumps([exp_id]))
        pages.append(_Page("compare_trials", compare, names))
        pages += [_Page(f"compare_trials_{Path(a).stem}_{Path(a).suffix[1:]}", compare,
                        [*names, a], click=a, images=len(trials))
                  for a in ("orbit.gif", "mesh_preview.png")]
    return pages


def screenshot_mlflow(tracking_uri: str, artifacts_root: str, experiment: str,
                      out_dir: str | Path, port: int = 0, seconds: float = 60.0,
                      size: tuple[int, int] = SIZE, workflow_type: str | None = None,
                      assistant: bool = False) -> dict[str, Shot]:
    """Serve a sweep's MLflow store and screenshot what a user sees of it.

    Saves ``out_dir/NAME.png`` for each page: ``runs_table``, ``runs_view_KEY`` (one per
    saved view of the experiment), ``sweep_run``, ``best_run``, ``best_run_orbit_gif``,
    ``best_run_mesh_preview_png``, ``compare_trials``, ``compare_trials_orbit_gif``,
    ``compare_trials_mesh_preview_png``; the server's log as ``out_dir/mlflow_server.log``;
    and ``out_dir/pages.json``: every ``Shot``, its visible text included.

    ``seconds`` bounds the wait for each page; ``size`` is the browser window's.
    ``workflow_type`` (``machine_learning`` or ``genai``) is added to every URL; None leaves
    the UI's own choice, GenAI for a new browser. ``assistant=False`` closes the MLflow
    Assistant panel, as a returning user has (it opens itself on a first visit).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, Shot] = {}
    with (mlflow_server(tracking_uri, artifacts_root, port, log=out / "mlflow_server.log") as base,
          tempfile.TemporaryDirectory(prefix="rf-chromium-", ignore_cleanup_errors=True)
          as profile):
        exp, parent, trials = sweep_runs(base, experiment)
        browser = Browser(Path(profile), size)
        try:
            if not assistant:
                browser.navigate(f"{base}/")
                browser.wait([], seconds, settle=0.0)
                browser.evaluate(ASSISTANT_CLOSED)
            for page in _pages(base, exp, parent, trials, workflow_type):
                browser.navigate(page.url)
                found = browser.wait(page.expected, seconds, 0 if page.click else page.images)
                if page.click:
                    found = (browser.evaluate(CLICK_ARTIFACT.format(name=json.dumps(page.click)))
                             and browser.wait(page.expected, seconds, page.images) and found)
                png = out / f"{page.name}.png"
                browser.screenshot(png)
                shots[page.name] = Shot(page.name, page.url, str(png), page.expected, found,
                                        browser.text()[:TEXT_CHARS])
        finally:
            browser.close()
    (out / "pages.json").write_text(json.dumps({k: asdict(v) for k, v in shots.items()},
                                               indent=2) + "\n")
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rf_bench.mlflow_ui",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--tracking-uri", required=True,
                        help="the store, e.g. sqlite:////tmp/store/mlflow.db")
    parser.add_argument("--artifacts", required=True, help="the store's artifact root")
    parser.add_argument("--experiment", required=True, help="the sweep's experiment name")
    parser.add_argument("--out", default="outputs/mlflow_ui", help="folder for the PNGs")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seconds", type=float, default=60.0, help="wait per page")
    parser.add_argument("--size", default=f"{SIZE[0]}x{SIZE[1]}", help="window, WxH")
    parser.add_argument("--workflow-type", choices=["machine_learning", "genai"],
                        help="the GenAI / Model training switch (default: the UI's choice)")
    parser.add_argument("--assistant", action="store_true",
                        help="leave the MLflow Assistant panel open, as on a first visit")
    args = parser.parse_args(argv)
    width, _, height = args.size.partition("x")
    shots = screenshot_mlflow(args.tracking_uri, args.artifacts, args.experiment, args.out,
                              args.port, args.seconds, (int(width), int(height)),
                              args.workflow_type, args.assistant)
    for shot in shots.values():
        print(f"{shot.name:34s} {'ok' if shot.found else 'NOT SHOWN':10s} {shot.png}")
    return 0 if all(s.found for s in shots.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
