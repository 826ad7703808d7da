"""Re-execute chapters top to bottom in a fresh kernel and store their outputs, as shipped.

    python notebooks/execute.py notebooks/0*.ipynb        # every chapter, with its runtime
    python notebooks/execute.py --finalize-only FILE ...  # only fix the stored progress bars

Outputs and widget state are stored. A progress bar is a widget: where widgets are not rendered
(GitHub, a plain text viewer) a notebook shows the text the bar had when it was *created* ("0%").
So after running, each stored bar's text is replaced by its final state, read from the stored
widget state ("stage 1: 100%|##########| 500/500 [02:28<00:00, ...]").
"""

from __future__ import annotations

import argparse
import html
import time
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def bar_text(state: dict, model_id: str) -> str | None:
    """The final text of a tqdm bar (an HBox of HTML, progress, HTML), or None if not one."""
    box = state.get(model_id, {})
    children = [c.removeprefix("IPY_MODEL_") for c in box.get("state", {}).get("children", [])]
    parts = [state.get(c, {}) for c in children]
    if box.get("model_name") != "HBoxModel" or len(parts) != 3 or "Progress" not in parts[1].get(
            "model_name", ""):
        return None
    left, right = (html.unescape(p["state"].get("value", "")).replace("\u2007", " ")
                   for p in (parts[0], parts[2]))
    value, total = parts[1]["state"].get("value") or 0, parts[1]["state"].get("max") or 1
    filled = round(10 * min(1.0, value / total))
    return f"{left}|{'#' * filled}{' ' * (10 - filled)}|{right}"


def hidden(state: dict, model_id: str) -> bool:
    """Whether a widget was hidden when the cell ended (tqdm hides a `leave=False` bar on close)."""
    layout = state.get(model_id, {}).get("state", {}).get("layout", "")
    return state.get(layout.removeprefix("IPY_MODEL_"), {}).get("state", {}).get(
        "visibility") == "hidden"


def finalize_progress_bars(nb) -> int:
    """Replace the text of every stored progress bar by its final state, and drop the bars that
    were hidden when they closed (the reader saw none); returns how many bars were kept."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    n = 0
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            text = bar_text(state, view["model_id"]) if view else None
            if text is not None and hidden(state, view["model_id"]):
                continue
            if text is not None:
                output["data"]["text/plain"] = text
                n += 1
            kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    return n


def execute(path: Path) -> float:
    """Run `path` top to bottom in a fresh kernel (cwd: its folder), store it; returns seconds."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=1200, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.time() - start
    finalize_progress_bars(nb)
    nbformat.write(nb, path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--finalize-only", action="store_true",
                        help="do not run anything: only replace the stored bars' text")
    args = parser.parse_args()
    for path in args.notebooks:
        if args.finalize_only:
            nb = nbformat.read(path, as_version=4)
            print(f"{path.name}: {finalize_progress_bars(nb)} progress bars")
            nbformat.write(nb, path)
        else:
            print(f"{path.name}: {execute(path):.1f} s", flush=True)


if __name__ == "__main__":
    main()
