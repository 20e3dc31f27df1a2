"""The widgets in a real browser: JupyterLab and Notebook 7 serve a notebook, headless Chromium runs it and clicks.

Needs Chromium (Debian's ``chromium``, or ``AUTOGLM_CHROMIUM`` naming an executable) and the
``playwright`` and ``notebook`` packages from the dev extra; Playwright's own browser download is
not used. Screenshots go to ``$AUTOGLM_ARTIFACTS_DIR/browser/<front end>`` (a temporary directory
by default).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SPEC = """\
name: qa
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}\\nPlan:"
    max_new_tokens: 8
  - name: answer
    model: tiny
    prompt: "{{ plan }}\\nAnswer:"
    max_new_tokens: 8
  - name: stats
    call: workbench.demo:answer_stats
output: answer
"""
# The cells of the notebook the browser runs; the last one reports kernel state as one JSON line.
CELLS = [
    "\n".join([
        "import json",
        "import workbench as wb",
        "%load_ext workbench",
        "bench = wb.current()",
        "bench.load('tiny', wb.tiny_model(), device='cpu')",
        f"chain = bench.chain({SPEC!r})",
        "run = chain.run(question='What is the capital of France?')",
        "print('SPANS', len(run.trace))",
    ]),
    "%autoglm trace --ui",
    "viewer = _autoglm_widget",
    "%autoglm builder qa",
    "builder = _autoglm_widget\nbuilder.inputs['question'].value = 'Why is the sky blue?'",
    "dashboard = wb.ComparisonDashboard(chain, [{'question': 'q'}] * 3, batching=['none'], repeats=1, warmup=0)\ndashboard",
    "%autoglm models --ui",
    (
        "print('STATE', json.dumps({'loaded': bench.registry.is_loaded('tiny'), 'selected': viewer.selected,"
        " 'runs': len(bench.runs()), 'compared': dashboard.comparison is not None}))"
    ),
]
VIEWER, BUILDER, DASHBOARD, MANAGER, PROBE = 1, 3, 5, 6, 7
# Each front end and where it opens a notebook. One server serves both: Notebook 7 is a server
# extension that a running JupyterLab server loads too.
FRONT_ENDS = {"jupyterlab": "lab/tree", "notebook7": "notebooks"}

pytestmark = pytest.mark.slow


def find_chromium() -> str | None:
    named = os.environ.get("AUTOGLM_CHROMIUM")
    if named:
        return named if Path(named).is_file() else shutil.which(named)
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium, or set AUTOGLM_CHROMIUM to one")
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = os.environ.get("AUTOGLM_ARTIFACTS_DIR")
    folder = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class JupyterServer:
    """A running Jupyter server: its address and token."""

    base: str
    token: str

    def notebook_page(self, front_end: str) -> str:
        """The page that opens this front end's copy of the widgets notebook in that front end."""
        return f"{self.base}/{FRONT_ENDS[front_end]}/{notebook_name(front_end)}?token={self.token}"


def notebook_name(front_end: str) -> str:
    # A copy per front end, so that each runs the cells in a kernel of its own from the start.
    return f"widgets-{front_end}.ipynb"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Iterator[JupyterServer]:
    """A headless Jupyter server (JupyterLab and Notebook 7) on a free local port with a token."""
    root = tmp_path_factory.mktemp("jupyter")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for front_end in FRONT_ENDS:
        nbformat.write(notebook, root / notebook_name(front_end))
    # No "get Jupyter news?" toast over the widgets' buttons.
    labconfig = root / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    disabled = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (labconfig / "page_config.json").write_text(json.dumps(disabled))
    port, token = free_port(), os.urandom(16).hex()
    env = {
        **os.environ,
        "AUTOGLM_CACHE_DIR": str(tiny_path.parents[0]),
        "AUTOGLM_DATA_DIR": str(root / "data"),
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "IPYTHONDIR": str(root / "ipython"),
    }
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
        "--JupyterNotebookApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None",
        "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False", "--allow-root",
    ]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"The Jupyter server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield JupyterServer(base, token)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def button(scope: Any, label: str) -> Any:
    """The widget button whose text is ``label`` (its icon font would be part of an accessible name)."""
    return scope.locator("button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_widgets_render_and_clicks_reach_the_kernel(
    front_end: str, chromium: str, server: JupyterServer, artifacts: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dev extra installs playwright")
    if front_end == "notebook7":
        pytest.importorskip("notebook", minversion="7", reason="the dev extra installs Notebook 7")
    shots = artifacts / front_end
    shots.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)
        sync_api.expect.set_options(timeout=90_000)
        try:
            run_and_click(page, sync_api.expect, server.notebook_page(front_end), shots)
        finally:
            page.screenshot(path=str(shots / "notebook.png"), full_page=True)
            browser.close()


def run_and_click(page: Any, expect: Any, url: str, shots: Path) -> None:
    page.goto(url)
    page.wait_for_function(
        "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    cells = page.locator(".jp-Notebook .jp-Cell")
    probe = cells.nth(PROBE).locator(".jp-OutputArea")
    expect(probe).to_contain_text('STATE {"loaded": true')
    spans = int(cells.nth(0).locator(".jp-OutputArea").inner_text().split()[-1])

    # Trace viewer: one bar per span of the run; hovering shows attributes; a click selects the row.
    viewer = cells.nth(VIEWER)
    expect(viewer.locator(".wb-waterfall .wb-bar")).to_have_count(spans)
    expect(viewer.locator(".wb-span-table tr[data-span-id]")).to_have_count(spans)
    call = viewer.locator(".wb-bar[data-kind='LLM']").first
    call.hover()
    expect(viewer.locator(".wb-tooltip")).to_contain_text("gen_ai.request.model = tiny")
    call.click()
    clicked = call.get_attribute("data-span-id")
    expect(viewer.locator(".wb-span-table tr.wb-selected")).to_have_attribute("data-span-id", clicked)
    viewer.screenshot(path=str(shots / "trace_viewer.png"))

    # Chain builder: the hop graph is drawn; the run button runs the chain in the kernel.
    builder = cells.nth(BUILDER)
    expect(builder.locator(".autoglm-hop")).to_have_count(3)
    button(builder, "run").click()
    expect(builder.locator(".autoglm-span-table")).to_contain_text("text_completion tiny")
    builder.screenshot(path=str(shots / "chain_builder.png"))

    # Comparison dashboard: the run fills in the progress bar, table and plot.
    dashboard = cells.nth(DASHBOARD)
    button(dashboard, "run comparison").click()
    expect(dashboard.locator(".autoglm-comparison")).to_contain_text("done")
    expect(dashboard.locator(".autoglm-comparison-table")).to_contain_text("none")
    expect(dashboard.locator("img")).to_be_visible()
    dashboard.screenshot(path=str(shots / "comparison_dashboard.png"))

    # Model manager: the unload button unloads the model in the kernel.
    manager = cells.nth(MANAGER)
    expect(manager.locator(".autoglm-model-manager")).to_contain_text("loaded")
    button(manager, "unload").click()
    expect(manager.locator(".autoglm-model-manager")).to_contain_text("unloaded 'tiny'")
    manager.screenshot(path=str(shots / "model_manager.png"))

    # The kernel saw every click: ask it, by running the probe cell again.
    page.evaluate(
        f"""() => {{
            const notebook = window.jupyterapp.shell.currentWidget.content;
            notebook.activeCellIndex = {PROBE};
            return window.jupyterapp.commands.execute('notebook:run-cell');
        }}"""
    )
    expect(probe).to_contain_text('STATE {"loaded": false')
    state = json.loads(probe.inner_text().split("STATE", 1)[1])
    assert state == {"loaded": False, "selected": clicked, "runs": state["runs"], "compared": True}
    assert state["runs"] >= 2 + 3  # the notebook's run, the builder's, the dashboard's three
