"""The workbook's chapters: Colab badge, setup cell, stored outputs, and the READMEs' links.

These are static checks of the `.ipynb` files; running the notebooks is nbval's job
(`pytest --nbval-lax notebooks/`).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHAPTERS = ("01_alignment", "02_stage1_pretraining", "03_stage2_finetuning", "04_chat",
            "05_attention_and_projected_tokens", "06_real_minigpt4")
WITH_IMAGES = ("01_alignment", "02_stage1_pretraining", "03_stage2_finetuning",
               "05_attention_and_projected_tokens")
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB = "https://colab.research.google.com/github/minigpt4-lite/minigpt4-lite/blob/main/notebooks/"
REPO_URL = re.compile(r'^REPO_URL = "https://github\.com/minigpt4-lite/minigpt4-lite"$', re.M)
ROOT_LINK = re.compile(r"\]\(\s*(?:\./)?notebooks/(\d\d_[A-Za-z0-9_]+)\.ipynb\s*\)")
LOCAL_LINK = re.compile(r"\]\(\s*(?:\./)?(\d\d_[A-Za-z0-9_]+)\.ipynb\s*\)")


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


def source(cell: dict) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_chapters_are_the_notebooks():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(CHAPTERS), "notebooks/ holds exactly the numbered chapters"


@pytest.mark.parametrize("name", CHAPTERS)
def test_colab_badge_first(name):
    first = load(name)["cells"][0]
    assert first["cell_type"] == "markdown"
    text = source(first)
    assert BADGE_SVG in text
    assert f"({COLAB}{name}.ipynb)" in text, "the badge opens this very notebook"


@pytest.mark.parametrize("name", CHAPTERS)
def test_setup_cell(name):
    first_code = source(code_cells(load(name))[0])
    assert REPO_URL.search(first_code), "the setup cell names REPO_URL once, as a plain variable"
    assert '"google.colab" in sys.modules' in first_code, "it installs only inside Colab"
    assert "pip" in first_code and "install" in first_code


@pytest.mark.parametrize("name", CHAPTERS)
def test_outputs_are_stored(name):
    cells = code_cells(load(name))
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), f"{name} has unexecuted cells: run it and save"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), \
        f"{name} was not executed top to bottom in one run (execution counts {counts})"
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{name} stored an error"
    assert outputs, f"{name} has no stored outputs"
    if name in WITH_IMAGES:
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no plot"


LESSONS = [c for c in CHAPTERS if not c.startswith("06")]  # 06 needs a GPU for most of it


@pytest.mark.parametrize("name", LESSONS)
def test_each_chapter_is_a_lesson(name):
    """Objectives, prerequisites, time and paper sections first; exercises with answers a student
    can reveal (>= 3) and a summary last (d2l / fastbook style)."""
    markdown = [source(c) for c in load(name)["cells"] if c["cell_type"] == "markdown"]
    opening = "\n".join(markdown[:3])
    for heading in ("Learning objectives", "Prerequisites", "Estimated student time",
                    "arxiv.org/abs/2304.10592"):
        assert heading in opening, f"{name} does not open with {heading!r}"
    text = "\n".join(markdown)
    assert "## Exercises" in text
    assert text.count("<details>") >= 3, f"{name} has fewer than 3 answers to reveal"
    assert "## Summary" in markdown[-1], f"{name} does not end with a summary"


def _linked(readme: Path, pattern: re.Pattern) -> set[str]:
    return set(pattern.findall(readme.read_text()))


def test_root_readme_links_every_chapter():
    linked = _linked(ROOT / "README.md", ROOT_LINK)
    missing = sorted(set(CHAPTERS) - linked)
    names = ", ".join(f"notebooks/{m}.ipynb" for m in missing)
    assert not missing, f"README.md does not link {names} (paste notebooks/README.md's table)"
    assert linked <= set(CHAPTERS), f"README.md links notebooks that do not exist: {linked}"


def test_notebooks_readme_links_every_chapter():
    linked = _linked(NOTEBOOKS / "README.md", LOCAL_LINK)
    assert linked == set(CHAPTERS)


@pytest.mark.parametrize("name", CHAPTERS)
def test_no_helpers_defined_in_cells(name):
    """Drawing helpers live in `minigpt4_lite.viz`, where tests check them: a helper defined in a
    cell once drew chapter 2's texts under the wrong scenes, and nothing could notice."""
    defined = [m for c in code_cells(load(name)) if "exercise" not in c["metadata"].get("tags", [])
               for m in re.findall(r"^\s*(?:async\s+)?(?:def|class)\s+(\w+)", source(c), re.M)]
    assert not defined, f"{name} defines {defined} in a cell: move them to minigpt4_lite.viz"


@pytest.mark.parametrize("name", ["02_stage1_pretraining", "03_stage2_finetuning"])
def test_training_chapters_read_their_seed_from_the_environment(name):
    """test_notebooks_perturbed.py re-runs these with another MINIGPT4_LITE_SEED; the seed lines
    must read it, or that run would silently repeat the stored one."""
    code = "\n".join(source(c) for c in code_cells(load(name)))
    assert 'SEED = int(os.environ.get("MINIGPT4_LITE_SEED", 42))' in code
    assert re.search(r"recipe\([^)]*\bseed=SEED\b", code), "train(...) must use SEED"
    assert "manual_seed(42)" not in code


@pytest.mark.parametrize("name", CHAPTERS)
def test_stored_progress_bars_show_their_final_state(name):
    """Where widgets do not render (GitHub), a bar shows its stored text: it must be the final
    state (`notebooks/execute.py` writes it), not the "0%" the bar had when it was created."""
    for cell in code_cells(load(name)):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                text = "".join(data.get("text/plain", ""))
                assert not re.search(r"\b0%\|", text), f"{name}: a stored bar shows {text!r}"


GPU_CHAPTER = "06_real_minigpt4"


def test_the_gpu_chapter_asks_colab_for_a_t4():
    """Opened from its badge, Colab starts the chapter on a GPU runtime (a free T4)."""
    metadata = load(GPU_CHAPTER)["metadata"]
    assert metadata.get("accelerator") == "GPU"
    assert metadata.get("colab", {}).get("gpuType") == "T4"


def test_gpu_cells_are_guarded_skipped_and_store_no_invented_output():
    """Every cell that downloads, loads the real model or chats runs only with a GPU
    (`if HAS_GPU:`) and is skipped by nbval; as no GPU run stored their outputs, they are empty,
    and a markdown cell says so."""
    nb = load(GPU_CHAPTER)
    heavy = ('device="cuda"', "downloads.fetch", "_download(", "Chat(", "interpret.")
    for cell in code_cells(nb):
        text = source(cell)
        skipped = text.startswith("# NBVAL_SKIP")
        if any(call in text for call in heavy):
            assert skipped and "if HAS_GPU" in text, f"an unguarded heavy cell: {text[:80]!r}"
        if skipped:
            assert "if HAS_GPU" in text, f"a skipped cell that is not guarded: {text[:80]!r}"
            if not cell.get("outputs"):
                notes = [source(c) for c in nb["cells"] if c["cell_type"] == "markdown"]
                assert any("not stored" in n and "no GPU run" in n for n in notes)


@pytest.mark.parametrize("name", CHAPTERS)
def test_no_chapter_fetches_a_photo_from_the_web(name):
    """Photos come from scikit-image's bundled ones (or the assets): no network in CI."""
    code = "\n".join(source(c) for c in code_cells(load(name)))
    assert "urlopen" not in code and "requests.get" not in code and "cocodataset" not in code
