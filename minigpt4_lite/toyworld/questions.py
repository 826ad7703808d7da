"""The wordings of ToyWorld's short questions: those training texts use, and those none uses.

`QUESTIONS` are the phrasings of every training text (the LLM's pretraining, stage 2's Q&A) and
of the evaluation's "trained wordings"; `HELDOUT_QUESTIONS` are in no training text at all: they
test whether a model answers the question or only recognises its wording (other verbs and word
orders, and words no training question uses: the US spelling "color", "located", "contain").
`{s}` a shape, `{t}` a colour + shape, `{p}` a cell, `{n}` "object" or "shape", `{z}` a size. A
position or size wording with `{s}` names the object by its shape alone, asked only where that
shape occurs once (else the kind's last wording, a `{t}` one: `language.qa_pairs`).

Why so many training wordings: with three or four per kind the demo answered held-out wordings
25-30 points worse than trained ones, with eight or so 12-15 points (docs/asset_history.md, "More
question wordings"). Why `LATER_WORDINGS`: four held-out wordings asked with a word that no
training question used ("What size is the red star?", "What is the number of shapes here?",
"Would I find ...", "Can you find ... here?") were answered as another kind of question (0-48%).
Vicuna has read such words in countless questions; our LLM reads them in these four wordings, in
the final phase of its pretraining only (`BuildConfig.final_steps`), so that its first phase and
its tokenizer draw exactly what they drew before (docs/asset_history.md, "Four more wordings").
"""

from __future__ import annotations

import re

QUESTIONS = {
    "colour": ("What colour is the {s}?", "Which colour is the {s}?",
               "What is the colour of the {s}?", "Tell me the colour of the {s}.",
               "Name the colour of the {s}.", "Look at the {s}. What colour is it?",
               "Please say what colour the {s} is.", "I want to know the colour of the {s}."),
    "count": ("How many {n}s are there?", "How many {n}s can you see?",
              "Count the {n}s in the image.", "How many {n}s are in the picture?",
              "Please count the {n}s.", "How many {n}s do you see in total?",
              "Say how many {n}s the picture has.", "Look at the image. How many {n}s are there?",
              "Give the number of {n}s in the picture."),
    "position": ("Where is the {t}?", "In which part of the image is the {t}?", "Where is the {s}?",
                 "Which cell holds the {t}?", "Please say where the {t} is.",
                 "Look for the {s}. Where is it?", "Where in the grid is the {s}?",
                 "Where can I find the {t}?"),
    "shape": ("What shape is in the {p}?", "Which shape is in the {p}?", "What is in the {p}?",
              "Look at the {p}. What is there?", "Name the shape in the {p}.",
              "Which object is in the {p}?", "What can be seen in the {p}?"),
    "size": ("Is the {t} small or large?", "Is the {t} large or small?", "How big is the {t}?",
             "Is the {s} small or large?", "How large is the {s}?",
             "Look at the {s}. Is it small or large?", "Tell me the size of the {s}.",
             "Please say how big the {t} is."),
    "existence": ("Is there {t}?", "Do you see {t}?", "Is there {t} in the picture?",
                  "Can you spot {t}?", "Do you see {t} anywhere?", "Is there {t} somewhere?",
                  "Look closely: is there {t}?", "Would you see {t} in the image?",
                  "Is it possible to find {t} in the image?", "Does the image show {t}?"),
    "by_size": ("Which object is {z}?", "Which shape is {z}?", "Which one is {z}?",
                "Point out the {z} object."),
}
# added later: read only in the LLM's final phase (and in stage 2 and the evaluation), never in
# its first phase or its tokenizer's corpus
LATER_WORDINGS = frozenset({"Give the number of {n}s in the picture.",
                            "Tell me the size of the {s}.", "Would you see {t} in the image?",
                            "Is it possible to find {t} in the image?"})
FIRST_PHASE_QUESTIONS = {kind: tuple(w for w in wordings if w not in LATER_WORDINGS)
                         for kind, wordings in QUESTIONS.items()}
HELDOUT_QUESTIONS = {
    "colour": ("What color is the {s}?", "Which color does the {s} have?",
               "Can you tell me what colour the {s} is?", "The {s} has which colour?"),
    "count": ("What is the number of {n}s here?", "Tell me how many {n}s there are.",
              "How many {n}s does this image show?", "Can you count the {n}s for me?"),
    "position": ("Where is the {s} located?", "Tell me where the {t} is.",
                 "In what part of the picture is the {t}?"),
    "shape": ("What do you see in the {p}?", "Which object sits in the {p}?",
              "Tell me what is in the {p}."),
    "size": ("Is the {t} big or small?", "What size is the {t}?",
             "Is the {t} a big one or a small one?"),
    "existence": ("Does the picture contain {t}?", "Is {t} in this image?",
                  "Can you find {t} here?", "Would I find {t} in this picture?"),
    "by_size": ("What is the {z} object?", "Name the {z} shape."),
}


def wording_pattern(wording: str) -> str:
    """A regular expression for the questions of `wording`: its slots (`{s}`, `{t}`...) match any
    words, the rest only itself. Finds a wording in a text, or the wording of a question."""
    return re.sub(r"\\\{\w\\\}", r"[\\w ]+?", re.escape(wording))
