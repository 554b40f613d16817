"""AA-CLIP's text prompts: state words, templates, and the official hand-written class names.

The official code describes each class with a hand-written phrase (``REAL_NAMES`` in its
``dataset/constants.py``, e.g. BTAD ``02`` -> "vertical fabric lines in ..."): the text anchors
then depend on knowing what the test class looks like, which a zero-shot protocol should not
assume. Here the class name itself is the default; :data:`OFFICIAL_REAL_NAMES` (those of the
data sets in our parity set) or a user mapping can be passed instead.
"""

from __future__ import annotations

from collections.abc import Mapping

NORMAL_STATES = ("{}", "a {}", "the {}")
ANOMALOUS_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")

#: The official hand-written descriptions (verbatim) for the classes the parity set uses.
OFFICIAL_REAL_NAMES: dict[str, dict[str, str]] = {
    "BTAD": {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, "
              "resembling a stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
    "Brain": {"Brain": "scan"},
    "VisA": {
        "candle": "candle", "pcb3": "infrared sensor pcb module", "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum", "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni", "pcb2": "integrated circuits board",
        "chewinggum": "chewing gum", "macaroni1": "orange macaroni", "cashew": "cashew nut",
        "fryum": "wheel-shaped fryum snack", "pcb1": "dual ultrasonic distance sensor pcb module",
    },
}


def state_sentences(name: str) -> tuple[list[str], list[str]]:
    """(normal, anomalous) sentences for one object name, state-major as the official code
    (3 x 2 normal, 5 x 2 anomalous)."""

    def expand(states: tuple[str, ...]) -> list[str]:
        return [template.format(state.format(name)) for state in states for template in TEMPLATES]

    return expand(NORMAL_STATES), expand(ANOMALOUS_STATES)


def describe_class(class_name: str, real_names: Mapping[str, str] | None = None) -> str:
    """The text that stands for ``class_name`` in the prompts: its entry in ``real_names`` if
    any, else the name with underscores as spaces (the paper protocol)."""
    if real_names and class_name in real_names:
        return real_names[class_name]
    return class_name.replace("_", " ")
