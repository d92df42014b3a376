"""What the tabs share: the model registry, the per-session components (who the visitor is,
which model they use) and the one function that switches a session's model everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from resnext import display_name

from .answers import TOP1
from .card import model_card
from .state import ASSETS, Models, new_owner, signature, signed_owner, valid_owner



def species_list(classes: list[str]) -> str:
    """The active model's classes in name order, as the list under the header."""
    from .card import plain

    names = sorted(display_name(c) for c in classes)
    return f"{len(names)} classes: " + ", ".join(plain(n) for n in names)


def examples() -> list[str]:
    return sorted(str(p) for p in ASSETS.glob("*.jpg")) if ASSETS.is_dir() else []


def example_species(path: str) -> str:
    """``assets/blue_jay.jpg`` -> ``blue jay``: the species an example photo shows."""
    return Path(path).stem.replace("_", " ").lower()


def example_caption(path: str) -> str:
    """What an example photo is captioned with in the gallery: its species, ``Blue Jay``."""
    return example_species(path).title()


def known_examples(classes: list[str]) -> list[tuple[str, str]]:
    """The example photos of species the model knows, as (path, caption): a model that does not
    know a species would only answer "not sure" or a wrong name for its photo."""
    known = {display_name(c).replace("-", " ").lower() for c in classes}
    return [(p, example_caption(p)) for p in examples() if example_species(p).replace("-", " ") in known]


HEADER = ("# Bird species from a photo\nDrop a photo of a bird: the app names its species, says so when it is not "
          "sure or sees no bird, and shows where in the photo it looked. {knows} Teach it your own in *Fine-tune*.")


def header(classifier, name: str, shipped: bool) -> str:
    """The page's first lines, for the model in use."""
    from .card import plain

    n = len(classifier.classes)
    if shipped:
        knows = f"It knows the {n} species listed here."
    else:
        knows = f"You are using **{plain(name)}**, which knows only the {n} classes listed here."
    return HEADER.format(knows=knows)


@dataclass
class Ctx:
    """The registry and the components more than one tab reads or writes."""

    registry: Models
    key: bytes = b""  # signs owner tokens (never sent to a browser)
    session: gr.State = None  # the visitor's owner token
    remembered: gr.BrowserState = None  # {"owner", "sig", "model"} kept in the visitor's browser
    model_name: gr.State = None  # the session's model
    pickers: list = field(default_factory=list)  # the model dropdowns (Classify, Model)
    card: gr.Markdown = None
    species: gr.Markdown = None  # the active model's classes, under the header
    target: gr.Dropdown = None
    top_k: gr.Slider = None
    example_box: gr.Column = None
    example_gallery: gr.Gallery = None
    header: gr.Markdown = None
    reanswer: tuple = None  # (fn, inputs, outputs): the Classify tab's answer, re-run after a model change

    def selection_outputs(self) -> list:
        return [self.session, self.remembered, self.model_name, *self.pickers, self.card, self.species, self.target,
                self.top_k, self.example_box, self.example_gallery, self.header]

    def select(self, owner: str | None, name: str | None) -> dict:
        """Everything that follows from the session using model ``name``."""
        owner = valid_owner(owner) or new_owner()
        names = self.registry.names(owner)
        name = name if name in names else self.registry.default
        classifier = self.registry.get(name, owner)
        classes = [TOP1] + sorted(display_name(c) for c in classifier.classes)
        n = len(classifier.classes)
        shipped = name == self.registry.default
        shown = known_examples(classifier.classes)
        updates = {
            self.session: owner,
            self.remembered: {"owner": owner, "sig": signature(self.key, owner), "model": name},
            self.model_name: name,
            self.card: model_card(classifier, shipped=shipped),
            self.species: species_list(classifier.classes),
            self.target: gr.Dropdown(choices=classes, value=TOP1),
            self.top_k: gr.Slider(maximum=min(10, n), value=min(5, n)),
            self.example_box: gr.Column(visible=bool(shown)),
            self.example_gallery: gr.Gallery(value=shown or None, allow_preview=False, selected_index=None),
            self.header: header(classifier, name, shipped),
        }
        updates.update({picker: gr.Dropdown(choices=names, value=name) for picker in self.pickers})
        return updates

    def restore(self, remembered) -> dict:
        """Page load: the visitor's token (if this server signed it) and model from their browser,
        else a new token."""
        model = remembered.get("model") if isinstance(remembered, dict) else None
        return self.select(signed_owner(self.key, remembered), model)
