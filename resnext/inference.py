"""The classifier: a checkpoint on a device, with top-k prediction and conv5 explanations."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .checkpoint import CheckpointInfo, load_checkpoint
from .composition import rules_for
from .detector import crop_boxes
from .explain import Explanation, conv5_cams
from .fast import configure_cpu_threads, fast_backbone
from .model import ResNeXt
from .names import display_name
from .transforms import ImageInput, check_box, load_image, shift_box, sub_box
from .verdict import bird_box

__all__ = ["Answer", "Classifier", "Prediction", "DEFAULT_CHECKPOINT", "display_name", "load_classifier", "select_device"]

# The default bird model ships here (see checkpoints/README.md).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "resnext50_32x4d_cub100.safetensors"


class Look(NamedTuple):
    """What the first look says of where the bird is (see :meth:`Classifier.looks`)."""

    bird: float | None  # "this photo shows a bird" in [0, 1]; None: the model cannot say
    area: float  # the bird's estimated share of the photo (0: no bird found)
    # Where find-the-bird looks closer, photo pixels: the square it classifies (a locator), or the
    # region the detector looks at again to place that square; None: the model has no finder.
    where: tuple[float, ...] | None


class Prediction(NamedTuple):
    label: str  # the class name as stored in the checkpoint
    index: int
    prob: float


class Answer(list):
    """One image's top-k :class:`Prediction` list (most probable first), with what else was found.

    Attributes:
        verdict: ``"species"``, ``"unsure"`` or ``"not_a_bird"`` (see :mod:`resnext.verdict`).
        bird: "this photo shows a bird" in [0, 1] (see :meth:`Classifier.bird_scores`; ``None``
            for a model with neither a bird head nor a locator).
        box: the part of the photo classified, (left, top, right, bottom) in photo pixels; a
            crop around the bird when find-the-bird made a second pass (``found`` is then True),
            or inside the box the caller gave (``boxed`` is then True).
    """

    def __init__(self, predictions, verdict: str, bird: float | None, box, found: bool, boxed: bool = False):
        super().__init__(predictions)
        self.verdict, self.bird, self.box, self.found, self.boxed = verdict, bird, tuple(box), found, boxed

    def to_dict(self) -> dict:
        """The answer as plain data: what the CLI's ``--json`` and the app's ``/answer`` give."""
        return {
            "verdict": self.verdict,
            "bird": None if self.bird is None else round(self.bird, 4),
            "box": [round(v, 1) for v in self.box],
            "found_bird": self.found,
            "boxed": self.boxed,
            "predictions": [p._asdict() for p in self],
        }


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; anything else is checked and used."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    return chosen


class Classifier:
    """A ResNeXt classifier ready for prediction and explanation.

    Attributes:
        model: the ResNeXt module, fp32, eval mode, on ``device``; parameters frozen.
        info: the checkpoint's metadata (architecture, classes, preprocessing, provenance).
        classes: class names in output order.
        preprocessing: the checkpoint's :class:`~resnext.transforms.Preprocessing`.
        device: where the model runs.
        fast_path: how the backbone runs, e.g. ``"oneDNN bf16"``, or ``"off"`` (plain fp32 model).

    With ``fast=True`` (the default) predictions and explanations come from the fast backbone of
    :mod:`resnext.fast` (folded BN, pre-packed oneDNN kernels, bf16 where the CPU has it); the
    head always runs in fp32 on the public ``model``'s weights.
    """

    def __init__(
        self,
        model: ResNeXt,
        info: CheckpointInfo,
        device: str | torch.device = "auto",
        path: Path | None = None,
        fast: bool = True,
    ):
        self.device = select_device(device)
        self.model = model.float().eval().requires_grad_(False).to(self.device)
        self.info = info
        self.classes = list(info.classes)
        self.preprocessing = info.preprocessing
        self.path = path
        self.rules = rules_for(model, info)
        if self.device.type == "cpu":
            configure_cpu_threads()
        self._backbone = self.model.forward_features
        self.fast_path = "off"
        if fast:
            self._backbone, self.fast_path = fast_backbone(self.model, self.device, self.preprocessing.input_size)
            if self.model.detector is not None and self.device.type == "cpu" and self.model.detector.use_fast_path():
                self.fast_path += "; detector oneDNN fp32"

    def __repr__(self) -> str:
        arch = self.info.architecture
        return (
            f"Classifier(layers={arch['layers']}, {arch['cardinality']}x{arch['group_depth']}d, "
            f"{len(self.classes)} classes, device={self.device.type}, fast_path={self.fast_path!r}, path={self.path})"
        )

    def preprocess(self, image: ImageInput) -> Tensor:
        """Any supported image -> the network input, (1, 3, H, W) on the CPU."""
        return self.preprocessing(load_image(image)).unsqueeze(0)

    def features(self, batch: Tensor) -> Tensor:
        """(B, 3, H, W) network input -> conv5 activation, computed without autograd."""
        with torch.inference_mode():
            return self._backbone(batch.to(self.device))

    def logits(self, features: Tensor) -> Tensor:
        """conv5 activation -> logits (B, num_classes), fp32."""
        with torch.inference_mode():
            return self.model.forward_head(features.float())

    def predict(
        self, images: ImageInput | Sequence[ImageInput], k: int = 5, batch_size: int = 16, find_bird: bool = True
    ) -> list[Answer]:
        """Top-k classes of each image, with a verdict.

        Args:
            images: one image or a list of them (paths, bytes, PIL images or numpy arrays).
            k: how many classes to return per image; clamped to the number of classes.
            batch_size: images per forward pass.
            find_bird: where the locator finds a small bird, classify a crop around it too and
                combine the two (a second forward pass for those photos only; see
                :mod:`resnext.verdict`). No effect on models without a locator.

        Returns:
            One :class:`Answer` per image: ``k`` :class:`Prediction`, most probable first, with
            its ``verdict``, bird score and the box classified.

        Raises:
            ValueError: ``k`` or ``batch_size`` is not a positive integer.
            FileNotFoundError, ImageLoadError: an image cannot be read (see :func:`load_image`).
        """
        k = self._check_k(k)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(images, (list, tuple)):
            images = [images]
        results: list[Answer] = []
        for start in range(0, len(images), batch_size):
            photos = [load_image(image) for image in images[start : start + batch_size]]
            results.extend(answer for answer, *_ in self._answer(photos, k, find_bird))
        return results

    def locate(self, features: Tensor) -> Tensor | None:
        """conv5 activation -> per-cell bird probabilities (B, h, w), or None without a locator."""
        if self.model.locator is None:
            return None
        with torch.inference_mode():
            return torch.sigmoid(self.model.forward_locator(features.float())).cpu()

    def bird_scores(self, features: Tensor, cells: Tensor | None) -> Tensor | None:
        """"This photo shows a bird", (B,) in [0, 1]: the bird head's score where the model has
        one, else the locator's best cell (``cells`` from :meth:`locate`); None without either."""
        if self.model.bird is None:
            return None if cells is None else cells.flatten(1).amax(1)
        with torch.inference_mode():
            return torch.sigmoid(self.model.forward_bird(features.float())).cpu()

    def bird_crop(self, photo, cells: Tensor, margin: float | None = None) -> tuple[float, tuple[float, ...]]:
        """The bird's estimated area (fraction of what the first pass saw) and the square box
        around it in ``photo``'s pixels, from the locator's cells ``(h, w)`` for that photo;
        ``margin`` defaults to the rules' ``find_margin``."""
        area, frac = bird_box(cells, margin=self.rules.find_margin if margin is None else margin)
        return area, sub_box(self.preprocessing.crop_box(*photo.size), frac)

    def looks(self, photos: list, features: Tensor | None, margin: float | None = None) -> list[Look]:
        """The first look at each decoded photo (given its first pass's conv5 ``features``, which a
        detector does not need): its bird score, the bird's estimated share of the photo, and where
        find-the-bird would look; from the bird detector where the model has one, else from the
        ResNeXt's own bird head and locator. ``margin`` defaults to the rules' ``find_margin``."""
        margin = self.rules.find_margin if margin is None else margin
        detector = self.model.detector
        if detector is not None:
            return [Look(*sighting) for sighting in detector.look_all(photos)]
        cells = self.locate(features)
        birds = self.bird_scores(features, cells)
        out = []
        for i, photo in enumerate(photos):
            bird = None if birds is None else float(birds[i])
            out.append(Look(bird, 0.0, None) if cells is None else Look(bird, *self.bird_crop(photo, cells[i], margin)))
        return out

    def closer_looks(self, photos: list, looks: list[Look], margin: float | None = None) -> list[tuple[float | None, tuple[float, ...]]]:
        """Find-the-bird's second look at each of ``photos`` where its ``looks`` say (one detector
        pass for all): (the bird score there, or None without a detector; the square box to
        classify, photo pixels)."""
        if self.model.detector is None:
            return [(None, look.where) for look in looks]
        margin = self.rules.find_margin if margin is None else margin
        return self.model.detector.look_closer_all(photos, [look.where for look in looks], margin)

    def _answer(self, photos: list, k: int, find_bird: bool, box=None) -> list[tuple[Answer, tuple[Tensor, Tensor], Tensor | None]]:
        """Answers for decoded photos, each with the (features, logits) of the pass it trusts most
        (the crop's when find-the-bird made one) and the whole photo's features where that pass ran
        (None where it did not), for explanations. ``box`` (one photo only): the
        part of the photo to classify, chosen by a person; find-the-bird then stays off.

        With a detector, it looks first (closer too, where it sends a photo closer), and one batched
        ResNeXt pass then classifies the whole photos and the crops together; a crop is classified
        only where the bird check passed, and the whole photo only where its answer counts
        (``crop_weight`` under 1, or no crop)."""
        if box is not None:
            box = check_box(box, photos[0].size)
            offset = self.preprocessing.crop_box(round(box[2] - box[0]), round(box[3] - box[1]))
            views, seen_boxes = [photos[0].crop(box)], [shift_box(offset, box)]
        else:
            views, seen_boxes = photos, [self.preprocessing.crop_box(*photo.size) for photo in photos]
        detector = self.model.detector is not None
        finds = find_bird and box is None
        if detector:  # the detector looks first: no ResNeXt pass is needed to know where to look closer
            looks, whole = self.looks(views, None), {}
            closer = [finds and bool(self.rules.looks_closer(None, look.area)) for look in looks]
        else:  # the ResNeXt's own bird head and locator read a first pass
            whole = dict(enumerate(self._passes(views)))
            looks = self.looks(views, torch.cat([whole[i][0] for i in range(len(views))]))
            closer = [finds and look.where is not None and bool(self.rules.looks_closer(look.bird, look.area)) for look in looks]
        closer_ones = [i for i in range(len(views)) if closer[i]]
        crops = dict(zip(closer_ones, self.closer_looks([photos[i] for i in closer_ones], [looks[i] for i in closer_ones])))
        birds = [look.bird for look in looks]
        for i, (seen, _) in crops.items():
            birds[i] = birds[i] if seen is None else self.rules.closer_bird(birds[i], seen)  # a small bird is scored where it is
        # No bird even after a closer look: the whole photo's answer, no box to show on, say, a cat's face.
        crops = {i: crop for i, crop in crops.items() if not self.rules.no_bird(birds[i])}
        boxes = {i: crop_boxes(box, photos[i].size) if detector else (box,) for i, (_, box) in crops.items()}
        crop_alone = self.rules.crop_weight >= 1.0 and self.rules.crop_when == "always"  # the whole photo's answer unused
        needed = [i for i in range(len(views)) if i not in whole and not (i in crops and crop_alone)]
        # One batched pass for the rest: the whole photos still needed and every crop (an image's
        # result does not depend on its batch; one pass of two costs about 0.75 of two passes).
        ran = self._passes([views[i] for i in needed] + [photos[i].crop(b) for i in crops for b in boxes[i]]) if needed or crops else []
        passes, crop_passes, at = {**whole, **dict(zip(needed, ran))}, {}, len(needed)
        for i in crops:  # the surer of the bird's squares (the first where they tie)
            tried, at = ran[at : at + len(boxes[i])], at + len(boxes[i])
            surer = max(range(len(tried)), key=lambda j: (float(tried[j][2].max()), -j))
            crop_passes[i], crops[i] = tried[surer], (crops[i][0], boxes[i][surer])
        out = []
        for i in range(len(photos)):
            if i in crops and i in passes and not self.rules.crop_counts(float(passes[i][2].max()), float(crop_passes[i][2].max())):
                del crops[i]  # the crop is less sure than the whole photo: the whole photo's answer stands
            if i in crops:
                chosen, box_used, found = crop_passes[i], crops[i][1], True
                p = chosen[2] if i not in passes else self.rules.mix(passes[i][2], chosen[2])
            else:
                chosen, box_used, found = passes[i], seen_boxes[i], False
                p = chosen[2]
            values, indices = p.topk(k)
            verdict = self.rules.verdict(float(values[0]), birds[i])
            predictions = [Prediction(self.classes[j], j, v) for v, j in zip(values.tolist(), indices.tolist())]
            whole_features = passes[i][0] if i in passes else None
            out.append((Answer(predictions, verdict, birds[i], box_used, found, boxed=box is not None), chosen[:2], whole_features))
        return out

    def _passes(self, views: list) -> list[tuple[Tensor, Tensor, Tensor]]:
        """One batched ResNeXt pass over decoded views: per view (conv5 features (1, C, h, w),
        logits (1, K), probabilities (K,) on the CPU)."""
        features = self.features(torch.stack([self.preprocessing(view) for view in views]))
        logits = self.logits(features)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        return [(features[i : i + 1], logits[i : i + 1], probs[i]) for i in range(len(views))]

    def explain(
        self, image: ImageInput, target: int | str | None = None, method: str = "gradcam", k: int = 5, find_bird: bool = True,
        box: Sequence[float] | None = None,
    ) -> Explanation:
        """Grad-CAM of one class on conv5, with the top-k from the same forward pass.

        Args:
            image: one image (path, bytes, PIL image or numpy array).
            target: class index or name to explain; ``None`` explains the top-1 class.
            method: a CAM method of :data:`resnext.explain.CAM_METHODS`.
            k: size of the top-k list returned with the explanation.
            box: (left, top, right, bottom) in the upright photo's pixels: classify and explain
                only that part (a box a person drew around the bird); it is drawn on the overlay.

        Raises:
            ValueError: unknown target or method, a bad ``k`` or a box outside the photo.
            FileNotFoundError, ImageLoadError: the image cannot be read.
        """
        return self.explain_classes(image, [target], method, k, find_bird=find_bird, box=box)[0]

    def explain_classes(
        self, image: ImageInput, targets: Sequence[int | str | None], method: str = "gradcam", k: int = 5, top: int = 0,
        find_bird: bool = True, box: Sequence[float] | None = None,
    ) -> list[Explanation]:
        """:meth:`explain` for several classes of one image, from one forward pass.

        ``None`` in ``targets`` means the top-1 class; ``top=n`` appends the maps of the ``n`` most
        probable classes. Seeing the top-3 side by side shows why the model hesitates between
        similar species.
        """
        k = self._check_k(k)
        photo = load_image(image)
        answer, (features, _), whole = self._answer([photo], len(self.classes), find_bird, box)[0]
        probs = {p.index: p.prob for p in answer}  # combined over both passes when there were two
        predictions = Answer(answer[:k], answer.verdict, answer.bird, answer.box, answer.found, answer.boxed)
        indices = [predictions[0].index if t is None else self.class_index(t) for t in targets]
        indices += [p.index for p in answer[: min(top, len(self.classes))]] if top > 0 else []
        size = self.preprocessing.input_size
        # The map of the pass the answer trusts most: the crop around the bird, when there was one.
        cams = conv5_cams(self.model, features, indices, method, (size, size))
        # Find-the-bird's crop is drawn inside the whole photo's map, so the heatmap covers the photo.
        whole_cams, whole_box = [None] * len(cams), None
        if answer.found:
            whole = self.features(self.preprocessing(photo)[None]) if whole is None else whole
            whole_cams, whole_box = conv5_cams(self.model, whole, indices, method, (size, size)), self.preprocessing.crop_box(*photo.size)
        return [
            Explanation(
                cam=cam, target=i, label=self.classes[i], prob=probs[i], predictions=predictions,
                method=method.lower(), photo=photo, box=answer.box, found=answer.found, boxed=answer.boxed,
                whole_cam=whole_cam, whole_box=whole_box,
            )
            for cam, whole_cam, i in zip(cams, whole_cams, indices)
        ]

    def class_index(self, target: int | str) -> int:
        """The output index of a class given by index or by name (stored or display form)."""
        if isinstance(target, bool):
            raise ValueError(f"unknown class {target!r}")
        if isinstance(target, int):
            if 0 <= target < len(self.classes):
                return target
            raise ValueError(f"class index {target} is out of range (0..{len(self.classes) - 1})")
        if isinstance(target, str):
            for i, name in enumerate(self.classes):
                if target in (name, display_name(name)):
                    return i
        raise ValueError(f"unknown class {target!r}; this model knows {len(self.classes)} classes")

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return min(k, len(self.classes))


def load_classifier(
    path: str | os.PathLike | None = None, device: str | torch.device = "auto", fast: bool = True
) -> Classifier:
    """Load a checkpoint (default: the bird model in ``checkpoints/``) as a :class:`Classifier`.

    ``fast=False`` turns off the fast inference path (see :class:`Classifier`).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (or no default model installed).
        ValueError: the file is not a valid checkpoint, or the device is unknown/unavailable.
    """
    if path is None:
        path = DEFAULT_CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(
                f"the default model {path.name} is not in {path.parent}; pass a checkpoint path"
            )
    path = Path(path)
    model, info = load_checkpoint(path)
    return Classifier(model, info, device=device, path=path, fast=fast)
