"""Chapter 5's checkers (`exercises.ch05`): a right answer passes, a blank is "not done yet",
and the usual slips raise an `ExerciseError` that says where (which query, word, token or cell)."""


import pytest
import torch
import torch.nn.functional as F
from helpers import STAGE2, stage2_model_and_scene

from minigpt4_lite import interpret
from minigpt4_lite.exercises import ExerciseError, ch05

pytestmark = pytest.mark.skipif(not STAGE2.is_dir(),
                                reason="needs the tiny model and its stage-2 projection in assets/")


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, pixels = stage2_model_and_scene()
    _, look = interpret.llm_attention_to_image(model, pixels, max_new_tokens=24)
    yield model, pixels, look
    torch.set_num_threads(before)


def blank(*args):
    raise NotImplementedError  # your code here


# --- one query's map ------------------------------------------------------------------------------
def query_map(weights, q, transpose=False, renormalise=True, cls_column=0):
    att = weights.mean((0, 1))[q]
    patches = att[1:] / att[1:].sum() if renormalise else att[1:]
    grid = patches.view(6, 6)
    return (grid.T if transpose else grid), att[cls_column]


def test_query_map_right_blank(setup, capsys):
    model, pixels, _ = setup
    assert ch05.check_query_map(query_map, model, pixels)
    assert "CLS" in capsys.readouterr().out
    assert ch05.check_query_map(blank, model, pixels) is False
    assert "not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("slip, message", [
    (lambda w, q: query_map(w, q, transpose=True), "transposed"),
    (lambda w, q: query_map(w, q, renormalise=False), "sums to"),
    (lambda w, q: query_map(w[:1], q), "every layer and every head"),  # layer 0 only
    (lambda w, q: (w.mean((0, 1))[q], w.mean((0, 1))[q, 0]), "drop it"),
    (lambda w, q: (query_map(w, q)[0].flatten(), query_map(w, q)[1]), "row by row"),
    (lambda w, q: (query_map(w, q)[0], 1 - query_map(w, q)[1]), "patches' share"),
    (lambda w, q: query_map(w, q)[0], "return two things"),
])
def test_query_map_slips_are_explained(setup, slip, message):
    model, pixels, _ = setup
    with pytest.raises(ExerciseError, match=message) as err:
        ch05.check_query_map(slip, model, pixels)
    assert "query 0" in str(err.value)


def test_query_map_names_the_cell_that_differs(setup):
    model, pixels, _ = setup

    def off_at_row_2_col_3(w, q):
        grid, cls = query_map(w, q)
        grid = grid.clone()
        grid[2, 3] += 0.01
        grid[0, 0] -= 0.01
        return grid, cls

    with pytest.raises(ExerciseError, match=r"query 0: .*row (2, column 3|0, column 0)"):
        ch05.check_query_map(off_at_row_2_col_3, model, pixels)


# --- where a word looked --------------------------------------------------------------------------
def word_heatmap(row, visual, maps, renormalise=True):
    to_visual = row[visual] / (row[visual].sum() if renormalise else 1)
    return torch.einsum("q,qij->ij", to_visual, maps)


def test_word_heatmap(setup, capsys):
    _, _, look = setup
    assert ch05.check_word_heatmap(word_heatmap, look)
    assert ch05.check_word_heatmap(blank, look) is False
    with pytest.raises(ExerciseError, match=r"word \d+ .*sums to .*divide"):
        ch05.check_word_heatmap(lambda r, v, m: word_heatmap(r, v, m, renormalise=False), look)
    with pytest.raises(ExerciseError, match="transposed"):
        ch05.check_word_heatmap(lambda r, v, m: word_heatmap(r, v, m).T, look)


# --- the lens -------------------------------------------------------------------------------------
def nearest_words(tokens, table, k):
    return (F.normalize(tokens, dim=-1) @ F.normalize(table, dim=-1).T).topk(k, dim=-1).indices


def test_nearest_words(setup, capsys):
    model, pixels, _ = setup
    assert ch05.check_nearest_words(nearest_words, model, pixels)
    assert "token 1 is nearest to" in capsys.readouterr().out
    assert ch05.check_nearest_words(blank, model, pixels) is False
    with pytest.raises(ExerciseError, match="dot product"):
        ch05.check_nearest_words(lambda t, e, k: (t @ e.T).topk(k, dim=-1).indices, model, pixels)
    with pytest.raises(ExerciseError, match=r"visual token 0: nearest ids differ at position 0"):
        ch05.check_nearest_words(lambda t, e, k: nearest_words(t, e, k + 1)[:, 1:], model, pixels)
    with pytest.raises(ExerciseError, match="shape"):
        ch05.check_nearest_words(lambda t, e, k: nearest_words(t, e, k).T, model, pixels)
