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


def knows_examples(classes: list[str]) -> bool:
    """Whether a model knows the example photos' species (a bird model), so they make sense."""
    known = {display_name(c).replace("-", " ").lower() for c in classes}
    return any(example_species(p).replace("-", " ") in known for p in examples())


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
    reanswer: tuple = None  # (fn, inputs, outputs): the Classify tab's answer, re-run after a model change

    def selection_outputs(self) -> list:
        return [self.session, self.remembered, self.model_name, *self.pickers, self.card, self.species, self.target,
                self.top_k, self.example_box]

    def select(self, owner: str | None, name: str | None) -> dict:
        """Everything that follows from the session using model ``name``."""
        owner = valid_owner(owner) or new_owner()
        names = self.registry.names(owner)
        name = name if name in names else self.registry.default
        classifier = self.registry.get(name, owner)
        classes = [TOP1] + sorted(display_name(c) for c in classifier.classes)
        n = len(classifier.classes)
        updates = {
            self.session: owner,
            self.remembered: {"owner": owner, "sig": signature(self.key, owner), "model": name},
            self.model_name: name,
            self.card: model_card(classifier, shipped=name == self.registry.default),
            self.species: species_list(classifier.classes),
            self.target: gr.Dropdown(choices=classes, value=TOP1),
            self.top_k: gr.Slider(maximum=min(10, n), value=min(5, n)),
            self.example_box: gr.Column(visible=knows_examples(classifier.classes)),
        }
        updates.update({picker: gr.Dropdown(choices=names, value=name) for picker in self.pickers})
        return updates

    def restore(self, remembered) -> dict:
        """Page load: the visitor's token (if this server signed it) and model from their browser,
        else a new token."""
        model = remembered.get("model") if isinstance(remembered, dict) else None
        return self.select(signed_owner(self.key, remembered), model)
