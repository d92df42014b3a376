import numpy as np
import pytest
import torch
from PIL import Image

from resnext import CAM_METHODS, ImageLoadError, Prediction, display_name, load_checkpoint, load_classifier
from resnext.inference import select_device

from conftest import CLASSES


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    """The classifier as users get it: fast path on."""
    return load_classifier(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def exact(tiny_checkpoint):
    """The plain fp32 path, for comparisons with reference implementations."""
    return load_classifier(tiny_checkpoint, device="cpu", fast=False)


def test_public_attributes(classifier, photo):
    assert classifier.classes == CLASSES
    assert not classifier.model.training
    assert next(classifier.model.parameters()).dtype == torch.float32
    x = classifier.preprocess(photo)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32


def test_predict_matches_the_model_and_is_sorted(exact, photo):
    (top,) = exact.predict(photo, k=3)
    with torch.no_grad():
        probs = torch.softmax(exact.model(exact.preprocess(photo)), dim=1)[0]
    expected = probs.argsort(descending=True)[:3].tolist()
    assert [p.index for p in top] == expected
    assert [p.label for p in top] == [CLASSES[i] for i in expected]
    assert [p.prob for p in top] == sorted((p.prob for p in top), reverse=True)
    assert top[0].prob == pytest.approx(probs.max().item(), abs=1e-6)
    assert isinstance(top[0], Prediction) and top[0].label == top[0][0]


def test_k_is_clamped_and_validated(classifier, photo):
    (top,) = classifier.predict(photo, k=100)
    assert len(top) == len(CLASSES)
    assert sum(p.prob for p in top) == pytest.approx(1.0, abs=1e-5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            classifier.predict(photo, k=bad)


def test_many_images_in_batches_equal_one_by_one(classifier, photo, photo_file):
    images = [photo, photo_file, str(photo_file), Image.fromarray(photo[::-1]), photo_file.read_bytes()]
    batched = classifier.predict(images, k=2, batch_size=2)
    single = [classifier.predict(image, k=2)[0] for image in images]
    assert len(batched) == 5
    for a, b in zip(batched, single):
        assert [p.index for p in a] == [p.index for p in b]
        assert [p.prob for p in a] == pytest.approx([p.prob for p in b], abs=1e-5)


def test_bad_image_raises_typed_error(classifier, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        classifier.predict([bad])
    with pytest.raises(FileNotFoundError):
        classifier.predict(tmp_path / "absent.png")


def _naive_gradcam(checkpoint, method_class, x, target):
    """pytorch-grad-cam used the naive way: hooks on the full model, backward through all of it."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, _ = load_checkpoint(checkpoint)
    with method_class(model=model, target_layers=[model.conv5]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"])
def test_one_pass_cam_equals_naive_full_model_cam(exact, tiny_checkpoint, photo, method):
    import pytorch_grad_cam

    for target in (None, 3):
        explanation = exact.explain(photo, target=target, method=method)
        method_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
        naive = _naive_gradcam(tiny_checkpoint, method_class, exact.preprocess(photo), explanation.target)
        assert explanation.cam.shape == naive.shape == (64, 64)
        assert np.abs(explanation.cam - naive).max() < 1e-4
        assert explanation.cam.max() > 0.5  # a real map, not all zeros


def test_finercam_contrasts_with_the_closest_classes(exact, tiny_checkpoint, photo):
    from pytorch_grad_cam import FinerCAM

    model, _ = load_checkpoint(tiny_checkpoint)
    x = exact.preprocess(photo)
    explanation = exact.explain(photo, method="finercam")
    with FinerCAM(model, target_layers=[model.conv5]) as cam:
        naive = cam(input_tensor=x, target_idx=explanation.target)[0]
    assert np.abs(explanation.cam - naive).max() < 1e-4


def test_explanation_contents(classifier, photo):
    e = classifier.explain(photo)
    (top,) = classifier.predict(photo, k=5)
    assert [p.index for p in e.predictions] == [p.index for p in top]
    assert e.target == top[0].index and e.label == top[0].label
    assert e.prob == pytest.approx(top[0].prob, abs=1e-6)
    assert e.cam.dtype == np.float32 and 0 <= e.cam.min() and e.cam.max() <= 1
    assert e.heatmap.shape == (90, 120) and 0 <= e.heatmap.min() and e.heatmap.max() <= 1
    assert e.overlay.shape == (90, 120, 3) and e.overlay.dtype == np.uint8


def test_heatmap_lines_up_with_the_photo(classifier):
    # 120x90 photo; input 64, resize 72: the network sees a centred 80x80 box, x 20..100, y 5..85.
    e = classifier.explain(np.zeros((90, 120, 3), np.uint8))
    assert e.box == pytest.approx((20, 5, 100, 85))
    cam = np.zeros((64, 64), np.float32)
    cam[:, :32] = 1.0  # left half of the crop
    e.cam = cam
    heat = e.heatmap
    assert heat[:, :19].max() == 0 and heat[:, 101:].max() == 0  # outside the crop
    assert heat[:4].max() == 0 and heat[86:].max() == 0
    assert heat[10:80, 22:58].min() == 1.0 and heat[10:80, 62:98].max() == 0.0  # halves of the box


def test_explain_target_by_index_and_name(classifier, photo):
    assert classifier.explain(photo, target=2).label == CLASSES[2]
    assert classifier.explain(photo, target="Cactus_Wren").target == 1
    assert classifier.explain(photo, target="Black-footed Albatross").target == 0
    for bad in (5, -1, "Dodo", 1.5):
        with pytest.raises(ValueError):
            classifier.explain(photo, target=bad)


def test_slow_and_unknown_methods_are_refused(classifier, photo):
    with pytest.raises(ValueError, match="scorecam.*many times"):
        classifier.explain(photo, method="scorecam")
    with pytest.raises(ValueError, match="unknown CAM method 'magic'"):
        classifier.explain(photo, method="magic")


def test_explain_leaves_no_hooks_and_no_gradients(classifier, photo):
    classifier.explain(photo)
    for module in classifier.model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.grad is None for p in classifier.model.parameters())


def test_overlay_opacity(classifier, photo):
    e = classifier.explain(photo)
    assert np.abs(e.overlay_with(0.0).astype(int) - photo.astype(int)).max() <= 2
    with pytest.raises(ValueError, match="opacity"):
        e.overlay_with(1.5)


def test_display_name():
    assert display_name("Black_footed_Albatross") == "Black-footed Albatross"
    assert display_name("American_Three_toed_Woodpecker") == "American Three-toed Woodpecker"
    assert display_name("Black_and_white_Warbler") == "Black-and-white Warbler"
    assert display_name("ABBOTTS BABBLER") == "ABBOTTS BABBLER"
    assert display_name("blue bar") == "blue bar"  # typed with spaces: kept as typed


def test_device_choice():
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_default_checkpoint_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("resnext.inference.DEFAULT_CHECKPOINT", tmp_path / "default.safetensors")
    with pytest.raises(FileNotFoundError, match="default model"):
        load_classifier()


def test_overlay_tints_only_what_the_network_saw(classifier):
    e = classifier.explain(np.full((90, 120, 3), 128, np.uint8))
    tinted = e.overlay_with(0.6).astype(int)
    assert (tinted[:, :20] == 128).all() and (tinted[:, 100:] == 128).all()  # outside the crop
    assert np.abs(tinted[10:80, 25:95] - 128).max() > 20  # inside: coloured


def test_explain_classes_share_one_pass_and_match_single_calls(exact, photo):
    many = exact.explain_classes(photo, [None, 2, "Cactus_Wren"], method="gradcam")
    assert [e.target for e in many][1:] == [2, 1]
    for e in many:
        single = exact.explain(photo, target=e.target)
        assert np.abs(e.cam - single.cam).max() < 1e-5
        assert e.predictions == many[0].predictions


def test_explain_classes_appends_the_top_n(exact, photo):
    many = exact.explain_classes(photo, [2], top=3)
    (top,) = exact.predict(photo, k=3)
    assert [e.target for e in many] == [2] + [p.index for p in top]
    assert len(exact.explain_classes(photo, [None], top=50)) == 1 + len(CLASSES)  # clamped


def test_a_drawn_box_is_classified_alone_and_mapped_back(exact, photo):
    box = (30, 12, 102, 84)  # (left, top, right, bottom) in the photo's pixels
    boxed = exact.explain(photo, box=box)
    alone = exact.explain(Image.fromarray(photo).crop(box))
    assert [p.label for p in boxed.predictions] == [p.label for p in alone.predictions]
    assert np.allclose([p.prob for p in boxed.predictions], [p.prob for p in alone.predictions], atol=1e-6)
    assert boxed.boxed and boxed.predictions.boxed and not boxed.found
    left, top, right, bottom = boxed.box  # the part the network saw: inside the drawn box
    assert box[0] <= left < right <= box[2] and box[1] <= top < bottom <= box[3]
    assert boxed.heatmap.shape == photo.shape[:2] and boxed.heatmap[:, : box[0]].max() == 0  # nothing outside
    assert boxed.predictions.to_dict()["boxed"] is True
    for bad in ((0, 0, 5, 5), (10, 10), "box", (200, 200, 300, 300)):
        with pytest.raises(ValueError, match="box"):
            exact.explain(photo, box=bad)
