"""The chat notebook in a real browser: JupyterLab + headless Chromium, driven with playwright.

Runs notebooks/04_chat.ipynb with "Run All Cells", asks the chat widget a question like a student
would (type, click Send), checks that an answer appears, and saves a screenshot to
tests/artifacts/chat_widget.png. Installs nothing: skipped without /usr/bin/chromium, the
playwright package or the built assets. Every wait has a time limit; the server is always stopped.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from minigpt4_lite.config import ASSETS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "04_chat.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SETTINGS = {  # user settings: no news toast, no update check, every cell rendered (no windowing)
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
QUESTION = "What colour is the star?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5, method: str = "GET"):
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def start_lab(tmp: Path, token: str, port: int) -> subprocess.Popen:
    """`jupyter lab` on 127.0.0.1 serving a copy of the notebook, with every Jupyter dir in tmp."""
    (tmp / "root" / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, tmp / "root" / "notebooks" / NOTEBOOK.name)  # autosave hits the copy
    for name, value in SETTINGS.items():
        path = tmp / "user-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               **{k: str(tmp / k.lower()) for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                                                    "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")})
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'root'}",
           f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    log = open(tmp / "lab.log", "wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


def wait_for_server(base: str, token: str, proc: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            get(f"{base}/api/status?token={token}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer within {limit} s")


def stop_lab(base: str, token: str, proc: subprocess.Popen) -> None:
    """Ask the server to shut down (it stops its kernels), then terminate/kill what is left."""
    try:
        get(f"{base}/api/shutdown?token={token}", method="POST")
        proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


ALL_RAN = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
  return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
}"""
NONE_RAN = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
  .every(p => !/\\d/.test(p.textContent))"""
ANSWERED = """(n) => {
  const bubbles = [...document.querySelectorAll('.mg4-assistant')];
  const send = [...document.querySelectorAll('button.jupyter-button')]
    .find(b => b.textContent.trim() === 'Send');
  return bubbles.length > n && send && !send.disabled
    && bubbles[bubbles.length - 1].textContent.replace('MiniGPT-4', '').trim().length > 0;
}"""


def test_chat_widget_in_jupyterlab(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is "
                                     "not installed (pip install playwright; no browser download "
                                     "needed)")
    if not (ASSETS / "llm").exists():
        pytest.skip("assets/ is not built: python -m minigpt4_lite build-assets --out assets")
    token, port = secrets.token_hex(16), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_lab(tmp_path, token, port)
    try:
        wait_for_server(base, token, proc)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                        headless=True, timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.set_default_timeout(60_000)

                def menu(top: str, item: str) -> None:
                    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
                    page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()

                page.goto(f"{base}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=90_000)
                idle = page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle"))
                idle.wait_for(timeout=90_000)  # the kernel has started
                # The stored outputs carry execution counts: clear them, so that "every prompt
                # shows a number" means "every cell ran now".
                menu("Edit", "Clear Outputs of All Cells")
                page.wait_for_function(NONE_RAN, timeout=30_000)
                menu("Run", "Run All Cells")
                page.wait_for_function(ALL_RAN, timeout=300_000, polling=1000)
                idle.wait_for(timeout=60_000)
                errors = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent")
                assert errors.count() == 0, errors.first.inner_text()

                box = page.locator(".widget-text input[placeholder='Ask about the image']")
                box.scroll_into_view_if_needed()
                n_before = page.locator(".mg4-assistant").count()
                box.fill(QUESTION)
                page.locator("button.jupyter-button", has_text="Send").first.click()
                page.wait_for_function(ANSWERED, arg=n_before, timeout=120_000, polling=250)
                transcript = page.locator(".mg4-transcript").first
                assert QUESTION in transcript.inner_text()
                answer = page.locator(".mg4-assistant").last.inner_text()
                assert answer.replace("MiniGPT-4", "").strip()

                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                widget = page.locator(".jp-OutputArea-output", has=transcript).first
                widget.scroll_into_view_if_needed()
                page.wait_for_timeout(300)  # let the last redraw settle
                widget.screenshot(path=str(ARTIFACTS / "chat_widget.png"))
            finally:
                browser.close()
    finally:
        stop_lab(base, token, proc)
