"""The workbook's exercises: blanks in the stored notebooks, solutions that pass their checks.

A chapter's build-it-yourself and coding exercises are code cells tagged `exercise` whose first
line is `# EXERCISE: <name>`; the stored (student) notebook leaves them blank. Their solutions are
in `notebooks/solutions/<chapter>.py`, one block per exercise under `# %% EXERCISE: <name>`. This
test runs each chapter's cells tagged `setup`, `exercise` and `check`, in order, with the solutions
filled in and `MINIGPT4_LITE_SOLUTIONS=1` (an exercise left undone is then an error), and asserts
that every check passed: a solution can never rot.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CHAPTERS = sorted(p for p in NOTEBOOKS.glob("0*.ipynb")
                  if any("exercise" in c.metadata.get("tags", [])
                         for c in nbformat.read(p, as_version=4).cells))
HEADER = re.compile(r"^# EXERCISE: (\S+)", re.MULTILINE)


def tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def solutions(chapter: Path) -> dict[str, str]:
    """The solution blocks of a chapter by exercise name."""
    text = (NOTEBOOKS / "solutions" / f"{chapter.stem}.py").read_text()
    blocks = re.split(r"^# %% EXERCISE: (\S+)\n", text, flags=re.MULTILINE)[1:]
    return {name: f"# EXERCISE: {name}\n" + code.strip() + "\n"
            for name, code in zip(blocks[::2], blocks[1::2])}


def exercise_name(cell) -> str:
    match = HEADER.match(cell.source)
    assert match, f"an exercise cell must start with '# EXERCISE: <name>': {cell.source[:60]!r}"
    return match.group(1)


def test_every_chapter_with_exercises_is_found():
    assert len(CHAPTERS) >= 5, [p.name for p in CHAPTERS]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_stored_notebook_is_the_student_version(chapter):
    nb = nbformat.read(chapter, as_version=4)
    cells = [c for c in nb.cells if "exercise" in tags(c)]
    names = [exercise_name(c) for c in cells]
    assert len(names) == len(set(names)), "two exercises share a name"
    for cell, name in zip(cells, names):
        assert "NotImplementedError" in cell.source or "..." in cell.source, (
            f"{chapter.name}: exercise {name} is not blank in the stored notebook")
    assert set(names) <= set(solutions(chapter)), "an exercise has no solution"
    assert any("check" in tags(c) for c in nb.cells)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_solutions_pass_every_check(chapter, tmp_path):
    nb = nbformat.read(chapter, as_version=4)
    answers = solutions(chapter)
    kept = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not {"setup", "exercise", "check"} & set(tags(cell)):
            continue
        if "exercise" in tags(cell):
            cell.source = answers[exercise_name(cell)]
        cell.outputs = []
        kept.append(cell)
    nb.cells = kept
    os.environ["MINIGPT4_LITE_SOLUTIONS"] = "1"
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        del os.environ["MINIGPT4_LITE_SOLUTIONS"]
    for cell in nb.cells:
        if "check" in tags(cell):
            text = "".join(o.get("text", "") for o in cell.outputs)
            assert "\N{CHECK MARK}" in text, f"{chapter.name}: a check did not pass:\n{cell.source}"
