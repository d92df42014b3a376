"""Verdicts and find-the-bird: what every answer says besides its top-k.

Every answer gets one verdict:
- ``"not_a_bird"``: the bird score is under ``bird_below`` (the bird head's where the model has one,
  else the locator's best cell; see ``Classifier.bird_scores``);
- ``"unsure"``: a bird, or something, but the top-1 probability is under ``unsure_below``, as for
  birds of species the model does not know;
- ``"species"``: the top-1 class, said plainly.

Find-the-bird: where the locator says the bird covers less than ``find_below`` of the frame, the
photo is cropped around it (a square ``find_margin`` times the bird's estimated side) and
classified again; the two answers' probabilities are combined with
weight ``crop_weight`` on the crop's (with ``crop_when="surer"``, only where the crop's top-1 is
surer than the whole photo's: else the whole photo's answer stands). Every number is chosen on
validation data by the training recipe (or a fine-tune) and stored in the checkpoint's provenance
under ``"verdict"``.

Serving code: no training imports here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["VERDICTS", "VerdictRules", "bird_box", "choose_unsure", "default_unsure", "raised_for_precision"]

VERDICTS = ("species", "unsure", "not_a_bird")
CROP_WHEN = ("always", "surer")
_THRESHOLDS = [round(t, 3) for t in torch.linspace(0.05, 0.95, 91).tolist()]  # the "unsure" thresholds tried


def default_unsure(num_classes: int) -> float:
    """Where there is no validation data to choose on: a third of the way from chance to
    certainty, so a 3-class model can be unsure too (0.56 for 3 classes, 0.34 for 100)."""
    chance = 1.0 / max(1, num_classes)
    return round(chance + (1 - chance) / 3, 3)


@dataclass(frozen=True)
class VerdictRules:
    """The thresholds of :mod:`resnext.verdict`, as stored in a checkpoint."""

    unsure_below: float
    bird_below: float | None = None  # None: the model cannot say "not a bird"
    find_below: float = 0.0  # 0: find-the-bird off
    crop_weight: float = 0.5
    source: str = "default"  # how the numbers were chosen
    find_margin: float = 1.6  # the crop's side over the bird's estimated side
    # With a detector: logits taken off its closer look's bird score before it counts. The closer
    # look goes where a bird is likeliest, so a photo with no bird scores higher there than whole.
    closer_offset: float = 0.0
    # "always": a crop's answer counts whenever find-the-bird made one; "surer": only where its
    # top-1 probability is higher than the whole photo's (a closer look that never hurts).
    crop_when: str = "always"

    def __post_init__(self) -> None:
        for name, low, high in (("unsure_below", 0, 1), ("find_below", 0, 1), ("crop_weight", 0, 1),
                                ("find_margin", 0.5, 4), ("bird_below", 0, 1), ("closer_offset", 0, 20)):
            value = getattr(self, name)
            if name == "bird_below" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                also = " or null" if name == "bird_below" else ""
                raise ValueError(f"verdict {name} must be a number in [{low}, {high}]{also}, got {str(value)[:40]!r}")
        if self.crop_when not in CROP_WHEN:
            raise ValueError(f"verdict crop_when must be one of {CROP_WHEN}, got {str(self.crop_when)[:40]!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"verdict source must be text, got {str(self.source)[:40]!r}")

    @classmethod
    def from_provenance(cls, provenance: dict, num_classes: int, has_bird_score: bool) -> "VerdictRules":
        """The rules a checkpoint records (the bird check and find-the-bird only for a network
        with a bird score: a locator or a bird head); older checkpoints get their
        ``unsure_below`` metric (or the default) and no bird check.

        Raises:
            ValueError: a stored verdict block without ``unsure_below``, or with a value of the
                wrong type or range (the message names the field).
        """
        stored = provenance.get("verdict")
        if stored is not None and not isinstance(stored, dict):
            raise ValueError(f"the verdict rules must be an object, got {str(stored)[:40]!r}")
        if stored is not None:
            if "unsure_below" not in stored:
                raise ValueError("the verdict rules have no 'unsure_below'")
            rules = cls(**{k: v for k, v in stored.items() if k in cls.__dataclass_fields__})
            return rules if has_bird_score else cls(rules.unsure_below, source=rules.source)
        legacy = (provenance.get("metrics") or {}).get("unsure_below")
        if isinstance(legacy, (int, float)) and legacy > 1.0 / max(1, num_classes):
            return cls(float(legacy), source="metrics.unsure_below")
        return cls(default_unsure(num_classes))

    def to_dict(self) -> dict:
        return asdict(self)

    def looks_closer(self, bird, area):
        """Whether find-the-bird makes its second pass: the bird is there and covers less than
        ``find_below``. Takes floats or tensors (one decision per element) alike."""
        use = (area > 0) & (area < self.find_below)
        if self.bird_below is not None and bird is not None:
            use = use & (bird >= self.bird_below)
        return use

    def crop_counts(self, whole_top1, crop_top1):
        """Whether a crop's answer counts, given the whole photo's and the crop's top-1
        probabilities (see ``crop_when``). Takes floats or tensors alike."""
        if self.crop_when == "always":
            return crop_top1 == crop_top1  # True, of the input's kind
        return crop_top1 > whole_top1

    def mix(self, whole, crop):
        """The answer's probabilities from the whole photo's and the crop's."""
        return (1 - self.crop_weight) * whole + self.crop_weight * crop

    def closer_bird(self, whole, closer):
        """The bird score after a closer look: the higher of the whole photo's and the closer
        look's, less ``closer_offset`` logits. Takes floats or tensors alike."""
        shifted = torch.sigmoid(torch.logit(torch.as_tensor(closer, dtype=torch.float64), eps=1e-12) - self.closer_offset)
        best = torch.maximum(torch.as_tensor(whole, dtype=torch.float64), shifted)
        return float(best) if best.dim() == 0 else best.float()

    def no_bird(self, bird: float | None) -> bool:
        """Whether the bird check says "not a bird" (never for a model that cannot say)."""
        return self.bird_below is not None and bird is not None and bird < self.bird_below

    def verdict(self, top1: float, bird: float | None) -> str:
        if self.no_bird(bird):
            return "not_a_bird"
        return "unsure" if top1 < self.unsure_below else "species"


def bird_box(cells: Tensor, margin: float = 1.6, min_side: float = 0.3) -> tuple[float, tuple[float, float, float, float]]:
    """The bird's estimated area and a square box around it, from the locator's per-cell
    probabilities ``(h, w)`` (the covered fraction of each conv5 cell).

    The area is the mean coverage; the centre is the coverage-weighted centroid, which places the
    box between cells. Returns ``(area, (left, top, right, bottom))`` as fractions of the input.
    """
    h, w = cells.shape
    cells = cells.float().clamp(0, 1)
    area = float(cells.mean())
    total = float(cells.sum())
    if total <= 1e-6:
        return 0.0, (0.0, 0.0, 1.0, 1.0)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    cy = float((cells.sum(1) * ys).sum()) / total
    cx = float((cells.sum(0) * xs).sum()) / total
    side = min(1.0, max(min_side, math.sqrt(area) * margin))
    left = min(max(cx - side / 2, 0.0), 1.0 - side)
    top = min(max(cy - side / 2, 0.0), 1.0 - side)
    return area, (left, top, left + side, top + side)


def choose_unsure(right: list[float], wrong: list[float], num_classes: int, others: list[float] | None = None) -> tuple[float, str]:
    """The "unsure" threshold from validation answers: the top-1 probabilities of right and wrong
    answers (and of photos of classes the model does not know, ``others``).

    Chooses the threshold that minimises the sum of the error rates (right answers flagged,
    wrong answers and unknown classes said plainly). With fewer than 5 right or 5 wrong answers
    that sum means little, and :func:`default_unsure` is used. Returns (threshold, how chosen).
    """
    if len(right) < 5 or len(wrong) < 5:
        return default_unsure(num_classes), f"default ({len(right)} right, {len(wrong)} wrong validation answers)"
    groups = [torch.tensor(right), torch.tensor(wrong)] + ([torch.tensor(others)] if others else [])
    best = (math.inf, 0.0)
    for t in _THRESHOLDS:
        cost = float((groups[0] < t).float().mean()) + sum(float((g >= t).float().mean()) for g in groups[1:])
        best = min(best, (cost, t))
    return best[1], "validation (minimum summed error rate)"


def raised_for_precision(threshold: float, right: list[float], wrong: list[float], precision: float) -> float | None:
    """The lowest "unsure" threshold at or above ``threshold`` (on :func:`choose_unsure`'s grid)
    under which at least ``precision`` of the answers said plainly are right, from the top-1
    probabilities of right and wrong validation answers; ``None`` where none is."""
    right_t, wrong_t = torch.tensor(right, dtype=torch.float32), torch.tensor(wrong, dtype=torch.float32)
    for t in (t for t in _THRESHOLDS if t >= threshold):
        said_right, said_wrong = int((right_t >= t).sum()), int((wrong_t >= t).sum())
        if said_right and said_right >= precision * (said_right + said_wrong):
            return t
    return None
