"""Each chapter's first cell sets up a fresh Colab runtime: run it here the way Colab would.

Colab runs a notebook with `google.colab` imported, in `/content`, on an interpreter whose
packages (torch, transformers, ipywidgets, matplotlib, ...) are preinstalled. The test mimics that
offline:

- `google.colab` is a stand-in module whose `output.enable_custom_widget_manager` records the call;
- `REPO_URL` is a `git clone` source of this repository (so only committed files arrive, as from
  GitHub) and `/content` a temporary folder;
- the interpreter is a fresh virtual environment that sees this environment's packages (minus this
  package) through a `.pth` file, the way Colab's preinstalled packages are seen; pip runs with
  `--no-index`, so the install succeeds only if every dependency is already there.

Then the package must import from the clone, and the cell's `chdir` must land in `notebooks/`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
OURS = ("minigpt4_lite", "minigpt4-lite", "__editable__", "__pycache__")

pytestmark = pytest.mark.slow  # a clone, a virtual environment and a pip install: about 30 s


def setup_cell(notebook: Path) -> str:
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    assert "setup" in cell.metadata.get("tags", []), f"{notebook.name}: the first cell's tag"
    return cell.source


def colab_block(source: str) -> str:
    """The part of a setup cell that runs only in Colab (up to the widget manager)."""
    head, marker, _ = source.partition("output.enable_custom_widget_manager()")
    assert marker, "the setup cell must enable Colab's widget manager"
    return head + marker


def chapters_by_block() -> dict[str, list[str]]:
    """Chapters grouped by their Colab block: one run per distinct block."""
    groups: dict[str, list[str]] = {}
    for notebook in NOTEBOOKS:
        groups.setdefault(colab_block(setup_cell(notebook)), []).append(notebook.name)
    return groups


@pytest.fixture
def colab_python(tmp_path_factory) -> Path:
    """A fresh runtime: an interpreter that sees this environment's packages as preinstalled,
    but not this package."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    base = tmp_path_factory.mktemp("colab")
    preinstalled = base / "preinstalled"
    preinstalled.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(OURS) and entry.suffix != ".pth":
            (preinstalled / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")],
                   check=True)
    python = base / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    Path(purelib.stdout.strip(), "preinstalled.pth").write_text(f"{preinstalled}\n")
    return python


# Runs in the Colab-like interpreter: the stand-in google.colab, then the cell through IPython.
RUNNER = """
import json, os, sys, types
calls = []
output = types.ModuleType("google.colab.output")
output.enable_custom_widget_manager = lambda: calls.append("enable_custom_widget_manager")
colab = types.ModuleType("google.colab")
colab.output = output
sys.modules.update({"google.colab": colab, "google.colab.output": output})

from IPython.core.interactiveshell import InteractiveShell
InteractiveShell.enable_gui = lambda self, gui=None: None  # a kernel's shell has it; inline: none
result = InteractiveShell.instance().run_cell(open(sys.argv[1]).read())
result.raise_error()
import minigpt4_lite
from minigpt4_lite.config import ASSETS
print(json.dumps({"cwd": os.getcwd(), "package": minigpt4_lite.__file__, "calls": calls,
                  "assets": sorted(p.name for p in ASSETS.iterdir())}))
"""


def run_setup_cell(python: Path, source: str, content: Path) -> dict:
    """Run a setup cell as Colab would; returns what the runner saw afterwards."""
    repo = content / "minigpt4-lite"
    cell = (source.replace('"https://github.com/minigpt4-lite/minigpt4-lite"',
                           json.dumps(ROOT.as_uri()))
            .replace('"/content/', f'"{content.as_posix()}/'))
    assert ROOT.as_uri() in cell and "/content/" not in cell.replace(str(content), "")
    (content.parent / "cell.py").write_text(cell)
    (content.parent / "runner.py").write_text(RUNNER)
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1",
               # Colab builds the package with a setuptools pip fetches; offline, the one there
               PIP_NO_BUILD_ISOLATION="0")
    done = subprocess.run([str(python), str(content.parent / "runner.py"),
                           str(content.parent / "cell.py")], cwd=content.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the setup cell failed:\n{done.stdout}\n{done.stderr}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    seen["repo"] = repo
    return seen


@pytest.mark.parametrize("block", list(chapters_by_block()),
                         ids=[",".join(n[:2] for n in names)
                              for names in chapters_by_block().values()])
def test_setup_cell_installs_the_clone_like_a_fresh_colab_runtime(block, colab_python,
                                                                  tmp_path):
    chapters = chapters_by_block()[block]
    source = setup_cell(ROOT / "notebooks" / chapters[0])
    needed = [name for name in ("bitsandbytes", "sentencepiece", "protobuf")
              if name in block or (name == "bitsandbytes" and "[quant]" in block)]
    missing = [name for name in needed
               if subprocess.run([str(colab_python), "-m", "pip", "show", "-q", name],
                                 capture_output=True).returncode != 0]
    if missing:
        pytest.skip(f"{', '.join(chapters)} install {missing}, which this environment lacks "
                    "(Colab has network access; here pip runs offline)")
    content = tmp_path / "content"
    content.mkdir()
    before = subprocess.run([str(colab_python), "-c", "import minigpt4_lite"], cwd=tmp_path,
                            capture_output=True)
    assert before.returncode != 0, "the package is importable before the cell ran"
    seen = run_setup_cell(colab_python, source, content)
    repo = seen["repo"]
    assert (repo / ".git").is_dir()  # cloned from REPO_URL
    assert Path(seen["cwd"]) == repo / "notebooks"  # relative paths as in a local checkout
    assert Path(seen["package"]).is_relative_to(repo / "minigpt4_lite")  # the clone's package
    assert {"llm", "vision_qformer", "projections"} <= set(seen["assets"])  # assets came along
    assert seen["calls"] == ["enable_custom_widget_manager"]
    # pip installed the clone into the runtime's environment (its metadata points at the clone)
    show = subprocess.run([str(colab_python), "-m", "pip", "show", "-f", "minigpt4-lite"],
                          capture_output=True, text=True, check=True).stdout
    assert str(repo) in show
    # a second run of the cell (the runtime still holds the clone) works too
    again = run_setup_cell(colab_python, source, content)
    assert Path(again["cwd"]) == repo / "notebooks"

