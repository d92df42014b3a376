"""A checkpoint is a stranger's file: every number its metadata declares is checked before
anything is built from it (the "safe in public" issue: a 398-byte file once grew the server to
21 GB)."""

import json
import re
import struct
import subprocess
import sys
import time

import pytest
import torch

from resnext import Preprocessing, load_checkpoint, read_metadata, save_checkpoint
from resnext.checkpoint import LIMITS, CheckpointLimits
from resnext.composition import architecture_cost
from resnext.model import resnext50_32x4d, resnext101_32x8d, resnext_tiny
from resnext.summary import stage_table

from conftest import CLASSES, ROOT

TINY = {"layers": [1, 1, 1, 1], "cardinality": 4, "group_depth": 2, "num_classes": 5, "stem_width": 8,
        "locator": False, "bird_head": False}
PRE = {"input_size": 64, "resize": 72, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "interpolation": "bilinear"}


def header_only(path, architecture=None, classes=None, preprocessing=None, provenance=None, raw=None):
    """A file that is only a safetensors header declaring a model: a few hundred bytes, no weights."""
    meta = {"format": 1, "architecture": architecture or TINY, "classes": CLASSES if classes is None else classes,
            "preprocessing": preprocessing or PRE, "provenance": provenance or {}}
    text = raw if raw is not None else json.dumps(meta)
    data = json.dumps({"__metadata__": {"resnext": text}}).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    return path


@pytest.mark.parametrize("config, size", [(resnext50_32x4d(1000).config(), 224), (resnext101_32x8d(7).config(), 448),
                                          (resnext_tiny(3).config(), 64), (dict(TINY, layers=[2, 1, 3, 1], locator=True,
                                                                               bird_head=True), 97)])
def test_cost_from_the_numbers_alone_is_the_built_networks(config, size):
    from resnext.composition import build_model

    model = build_model(config)
    params, macs = architecture_cost(config, size)
    assert params == sum(p.numel() for p in model.parameters())
    assert macs == sum(r["macs"] for r in stage_table(model, size))


def test_every_real_resnext_is_within_the_limits(tmp_path):
    path = save_checkpoint(tmp_path / "r101.safetensors", resnext101_32x8d(1000), [f"c{i}" for i in range(1000)],
                           Preprocessing(448, 512))
    info = read_metadata(path)
    assert info.architecture["layers"] == [3, 4, 23, 3] and info.preprocessing.input_size == 448


@pytest.mark.parametrize("change, message", [
    (dict(architecture=dict(TINY, layers=[1.5, 2.5, 1e300, 1])), r"layers\[0\] .*must be an integer from 1 to 64, got 1.5"),
    (dict(architecture=dict(TINY, layers=[1, 1, 10**12, 1])), r"layers\[2\] .*from 1 to 64"),
    (dict(architecture=dict(TINY, layers=[1, 1, 1])), "4 block counts"),
    (dict(architecture=dict(TINY, layers=[1, 1, True, 1])), r"layers\[2\]"),
    (dict(architecture=dict(TINY, cardinality="4")), "cardinality must be an integer"),
    (dict(architecture=dict(TINY, stem_width=10_000)), "stem_width must be an integer from 1 to 256"),
    (dict(architecture=dict(TINY, locator="yes")), "locator must be true or false"),
    (dict(architecture=dict(TINY, detector=100_000)), r"detector \(its input size\) must be an integer from 64 to 640"),
    (dict(architecture=dict(TINY, detector="288")), r"detector \(its input size\) must be an integer"),
    (dict(preprocessing=dict(PRE, framing="sideways")), r"framing must be one of \['crop', 'whole'\]"),
    (dict(architecture=dict(TINY, extra=1)), r"unknown architecture fields \['extra'\]"),
    (dict(architecture=dict(resnext50_32x4d(5).config(), group_depth=64)), r"parameters; the limit is 200,000,000"),
    (dict(architecture=dict(resnext101_32x8d(5).config()), preprocessing=dict(PRE, input_size=1024, resize=1024)),
     "multiply-accumulates per image at 1024 px; the limit is 100,000,000,000"),
    (dict(architecture=dict(TINY, num_classes=30_000), classes=[f"c{i}" for i in range(30_000)]),
     "num_classes must be an integer from 1 to 25,000"),
    (dict(classes=["a", "b", "a", "c", "b"]), r"class names are not unique: \['a', 'b'\]"),
    (dict(classes=["a", "b", "c", "d", "x" * 201]), "must have 1 to 200 characters"),
    (dict(classes=["a", "b", "c", "d", ""]), "must have 1 to 200 characters"),
    (dict(preprocessing=dict(PRE, input_size=6000, resize=6000)), "input_size must be an integer from 8 to 1024"),
    (dict(preprocessing=dict(PRE, resize=10_000)), "resize must be an integer from input_size"),
    (dict(preprocessing=dict(PRE, mean=["0.5", 0.5, 0.5])), "mean must be 3 numbers"),
    (dict(provenance={"metrics": {"val_acc": "ninety"}}), "metrics.val_acc must be a number from 0 to 1"),
    (dict(provenance={"metrics": [1]}), "'metrics' must be an object"),
    (dict(provenance=["x"]), "'provenance' must be an object"),
    (dict(provenance={"verdict": {"bird_below": 0.5}}), "verdict rules have no 'unsure_below'"),
    (dict(architecture=dict(TINY, bird_head=True), provenance={"verdict": {"unsure_below": 0.3, "bird_below": "x"}}),
     "verdict bird_below must be a number in"),
    (dict(provenance={"verdict": {"unsure_below": 2}}), r"verdict unsure_below must be a number in \[0, 1\]"),
    (dict(provenance={"verdict": "strict"}), "verdict rules must be an object"),
    (dict(raw='{"format": 1, "architecture": {"layers": [1, 1, 1, Infinity]}}'), "Infinity is not a number"),
    (dict(raw="[" * 100_000 + "]" * 100_000), "nested too deeply"),
])
def test_declared_sizes_and_types_are_refused_before_anything_is_built(tmp_path, change, message):
    path = header_only(tmp_path / "tiny.safetensors", **change)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as err:
        load_checkpoint(path)
    assert time.perf_counter() - start < 20  # normal: milliseconds; the 1e300 case once ran until killed
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "nest.safetensors"
    data = ("{\"a\":" * 50_000 + "1" + "}" * 50_000).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    with pytest.raises(ValueError, match="nest.safetensors: not a safetensors file .*nested too deeply"):
        read_metadata(path)


def test_a_header_over_the_limit_is_refused_unread(tmp_path):
    """A million-class list (12.9 MB) is refused by its declared header length alone."""
    path = header_only(tmp_path / "classes.safetensors", classes=[f"class {i}" for i in range(400_000)])
    with pytest.raises(ValueError, match="header claims .* bytes"):
        read_metadata(path)


META = []  # the tiny checkpoint's own __metadata__, for tests that rebuild a whole header


def _tensor_table(tmp_path, edit):
    path = save_checkpoint(tmp_path / "m.safetensors", resnext_tiny(5), CLASSES, Preprocessing(64, 72))
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    META[:] = [header["__metadata__"]]
    edit(header)
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + length :])
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["fc.weight"].update(dtype="F64"), r"fc.weight is stored as F64; weights must be one of"),
    (lambda h: h["fc.weight"].update(dtype="I64"), r"fc.weight is stored as I64"),
    (lambda h: h["fc.weight"].update(shape=[5, 256, 1]), r"fc.weight has shape \(5, 256, 1\)"),
    (lambda h: h["fc.weight"].update(data_offsets=[0, 2**60]), "fc.weight declares .* which do not fit its shape"),
    (lambda h: h.update({"x" * 100: h["fc.bias"]}), "unexpected"),
])
def test_tensor_table_is_checked_against_the_architecture(tmp_path, edit, message):
    path = _tensor_table(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)


def test_limits_can_be_tightened():
    tight = CheckpointLimits(max_classes=4)
    assert tight.max_classes == 4 and LIMITS.max_classes == 25_000


def test_cli_refuses_a_huge_network_quickly_in_little_memory(tmp_path, photo_file):
    """The 398-byte file of the issue: ``layers [1.5, 2.5, 1e300, 1]`` (21 GB before the fix)."""
    path = header_only(tmp_path / "huge.safetensors", architecture=dict(TINY, layers=[1.5, 2.5, 1e300, 1]))
    # The peak of this process's own address space (VmHWM); getrusage's ru_maxrss would carry
    # the parent's (pytest's) peak across the fork and exec.
    probe = ("import sys\nfrom pathlib import Path\nfrom resnext.__main__ import main\n"
             f"code = main(['predict', '--checkpoint', {str(path)!r}, {str(photo_file)!r}])\n"
             "peak = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))\n"
             "print('maxrss_kb', peak.split()[1], file=sys.stderr)\n"
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and done.stdout == ""
    assert lines[0].startswith("error: ") and "layers[0]" in lines[0] and len(lines) == 2
    rss_mb = int(lines[1].split()[1]) / 1024
    assert rss_mb < 1500, rss_mb  # normal: ~450 MB (torch imported)


def test_meta_shapes_allocate_nothing():
    """The shape check builds the declared network on the meta device: even a huge one costs no memory."""
    from resnext.composition import build_model

    with torch.device("meta"):
        model = build_model(dict(resnext50_32x4d(5).config(), group_depth=64))
    assert all(p.device.type == "meta" for p in model.parameters())


GOOD_RULES = {"unsure_below": 0.3, "bird_below": 0.5, "find_below": 0.4, "crop_weight": 1.0, "find_margin": 1.3,
              "source": "validation"}


@pytest.mark.parametrize("field, value", [(f, v) for f in GOOD_RULES for v in ("x", None, 7, -1, True, [0.5])
                                          if not (f == "bird_below" and v is None)
                                          and not (f == "find_margin" and v == 1)])
def test_every_field_of_stored_verdict_rules_is_checked_where_it_is_read(tmp_path, field, value):
    """A verdict block with one field of the wrong type or range: one ValueError naming the field
    (it was a TypeError, which the app and the CLI did not catch)."""
    rules = dict(GOOD_RULES, **{field: value})
    path = header_only(tmp_path / "rules.safetensors", architecture=dict(TINY, bird_head=True),
                       provenance={"verdict": rules})
    if field == "source" and isinstance(value, str):
        read_metadata(path)  # any text is a fine source
        return
    with pytest.raises(ValueError, match=f"verdict {field} must be"):
        read_metadata(path)


def test_stored_rules_without_unsure_below_are_refused(tmp_path):
    rules = {k: v for k, v in GOOD_RULES.items() if k != "unsure_below"}
    path = header_only(tmp_path / "rules.safetensors", provenance={"verdict": rules})
    with pytest.raises(ValueError, match="rules.safetensors: malformed checkpoint metadata: the verdict rules have no "
                                         "'unsure_below'"):
        read_metadata(path)


def test_app_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    path = header_only(tmp_path / "rules.safetensors", provenance={"verdict": dict(GOOD_RULES, bird_below="x")})
    done = subprocess.run([sys.executable, "app.py", "--checkpoint", str(path), "--workdir", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "verdict bird_below must be" in lines[0]


def _expected_names():
    from resnext.composition import build_model

    with torch.device("meta"):
        return sorted(k for k in build_model(TINY).state_dict() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("drop, extra, shown", [
    (3, 0, "(missing {m3}, unexpected [])"),
    (4, 0, "(missing {m3}..., unexpected [])"),
    (0, 3, "(missing [], unexpected {u3})"),
    (0, 4, "(missing [], unexpected {u3}...)"),
])
def test_a_mismatched_tensor_table_is_named_in_three_names_at_most(tmp_path, drop, extra, shown):
    names = _expected_names()
    keep = names[drop:]
    long_names = [f"{i}" + "x" * 100 for i in range(extra)]
    header = {n: {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]} for n in keep + long_names}
    path = _tensor_table(tmp_path, lambda h: (h.clear(), h.update(header, __metadata__=META[0])))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    detail = shown.format(m3=names[:3], u3=[u[:60] for u in sorted(long_names)[:3]])
    assert str(err.value) == f"{path}: weights do not match the architecture {detail}"


@pytest.mark.parametrize("edit, detail", [
    (lambda h: h.update({"fc.bias": 5}), "tensor fc.bias has shape None, the architecture needs (5,)"),
    (lambda h: h["fc.bias"].update(shape="s" * 100), f"tensor fc.bias has shape {'s' * 60}, the architecture needs (5,)"),
    (lambda h: h["fc.bias"].update(dtype="D" * 30), f"tensor fc.bias is stored as {'D' * 20}; weights must be one of "
                                                    "['BF16', 'F16', 'F32']"),
    (lambda h: h["fc.bias"].update(data_offsets=[0, 10, 10]), "tensor fc.bias declares [0, 10, 10] as its bytes"),
    (lambda h: h["fc.bias"].update(data_offsets=[0]), "tensor fc.bias declares [0] as its bytes"),
    (lambda h: h["fc.bias"].update(data_offsets=["0", "10"]), "tensor fc.bias declares ['0', '10'] as its bytes"),
    (lambda h: h["fc.bias"].update(data_offsets="o" * 100), f"tensor fc.bias declares {'o' * 60} as its bytes"),
])
def test_each_declared_tensor_is_named_with_what_is_wrong(tmp_path, edit, detail):
    path = _tensor_table(tmp_path, edit)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: {detail}")


def test_the_parameter_budget_admits_exactly_its_limit(tmp_path):
    path = header_only(tmp_path / "tiny.safetensors")
    params, macs = architecture_cost(TINY, 64)
    assert read_metadata(path, CheckpointLimits(max_parameters=params, max_macs=macs)).architecture == TINY
    with pytest.raises(ValueError, match=f"has {params:,} parameters; the limit is {params - 1:,}"):
        read_metadata(path, CheckpointLimits(max_parameters=params - 1))
    with pytest.raises(ValueError, match=f"needs {macs:,} multiply-accumulates per image at 64 px; the limit is"):
        read_metadata(path, CheckpointLimits(max_macs=macs - 1))


LONG = "y" * 100


@pytest.mark.parametrize("change, detail", [
    (dict(architecture=["x"]), "'architecture' must be an object"),
    (dict(architecture=dict(TINY, layers="1111")), "layers must be a list of 4 block counts (conv2..conv5), got 1111"),
    (dict(architecture=dict(TINY, layers=[1] * 40)), f"layers must be a list of 4 block counts (conv2..conv5), got {str([1] * 40)[:60]}"),
    (dict(architecture=dict(TINY, layers=[1, 1, 1, 65])), "layers[3] (blocks of conv5) must be an integer from 1 to 64, got 65"),
    (dict(architecture=dict(TINY, layers=[1, 1, 1, LONG])), f"layers[3] (blocks of conv5) must be an integer from 1 to 64, got {LONG[:40]}"),
    (dict(architecture={**TINY, **{f"f{i}{LONG}": 1 for i in range(7)}}),
     f"unknown architecture fields {sorted(f'f{i}{LONG}'[:40] for i in range(7))[:5]}"),
    (dict(architecture=dict(TINY, bird_head=LONG)), f"bird_head must be true or false, got {LONG[:40]}"),
    (dict(architecture={k: v for k, v in TINY.items() if k != "cardinality"}), "cardinality must be an integer from 1 to 256, got None"),
    (dict(classes="abcde"), "'classes' must be a list of strings"),
    (dict(classes=["a", "b", "c", "d", 5]), "'classes' must be a list of strings"),
    (dict(classes=["a", "b", "c", "d", LONG * 3]), f"class name {LONG[:40]!r} must have 1 to 200 characters"),
    (dict(architecture=dict(TINY, num_classes=10), classes=list("aabbccddef")), "class names are not unique: ['a', 'b', 'c']"),
    (dict(preprocessing=["x"]), "'preprocessing' must be an object"),
    (dict(provenance={"metrics": {"test_top1": 2}}), "provenance metrics.test_top1 must be a number from 0 to 1, got '2'"),
    (dict(provenance={"metrics": {"test_top5": -0.1}}), "provenance metrics.test_top5 must be a number from 0 to 1, got '-0.1'"),
    (dict(provenance={"metrics": {"unsure_below": True}}), "provenance metrics.unsure_below must be a number from 0 to 1, got 'True'"),
    (dict(provenance={"metrics": {"val_acc": LONG}}), f"provenance metrics.val_acc must be a number from 0 to 1, got {LONG[:40]!r}"),
    (dict(provenance={"metrics": {"val_photos": 2.5}}), "provenance metrics.val_photos must be a whole number from 0 to 10^8, got '2.5'"),
    (dict(provenance={"metrics": {"val_photos": True}}), "provenance metrics.val_photos must be a whole number from 0 to 10^8, got 'True'"),
    (dict(provenance={"metrics": {"val_photos": 10**8 + 1}}), "provenance metrics.val_photos must be a whole number from 0 to 10^8, got '100000001'"),
    (dict(provenance={"metrics": 5}), "provenance 'metrics' must be an object"),
    (dict(provenance=[1]), "'provenance' must be an object"),
    (dict(raw="[1, 2]"), "unsupported format version [1, 2]"),
    (dict(raw='{"format": 7}'), "unsupported format version 7"),
    (dict(raw="[" * 100_000 + "]" * 100_000), "JSON nested too deeply"),
    # the verdict rules are read with the bird check where the network has a bird score
    (dict(architecture=dict(TINY, locator=True), provenance={"verdict": {"unsure_below": 0.3, "bird_below": 5}}),
     "verdict bird_below must be a number in [0, 1] or null, got '5'"),
])
def test_each_malformed_field_gets_its_own_exact_message(tmp_path, change, detail):
    path = header_only(tmp_path / "m.safetensors", **change)
    with pytest.raises(ValueError) as err:
        read_metadata(path)
    assert str(err.value) == f"{path}: malformed checkpoint metadata: {detail}"


def test_values_at_the_edges_of_their_limits_are_accepted(tmp_path):
    no_stem_width = {k: v for k, v in dict(TINY, layers=[64, 1, 1, 1]).items() if k != "stem_width"}  # optional: 64
    path = header_only(tmp_path / "edge.safetensors", architecture=no_stem_width,
                       classes=["a", "b", "c", "d", "e" * 200],
                       provenance={"metrics": {"val_acc": 0, "test_top1": 1, "test_top5": 1.0, "unsure_below": None,
                                               "per_class": {"a": "any"}}})
    info = read_metadata(path)
    assert info.architecture["layers"] == [64, 1, 1, 1] and "stem_width" not in info.architecture
    assert info.classes[-1] == "e" * 200 and info.provenance["metrics"]["val_acc"] == 0


def test_every_stored_rule_is_checked_whether_the_network_uses_it_or_not(tmp_path):
    """A network without a bird score does not use a stored bird check, but a wrong one is still a
    wrong file; a right one is kept in the provenance as it was."""
    path = header_only(tmp_path / "m.safetensors", provenance={"verdict": {"unsure_below": 0.3, "bird_below": 0.5}})
    assert read_metadata(path).provenance["verdict"]["bird_below"] == 0.5
    for head in ("locator", "bird_head", None):
        architecture = dict(TINY, **{head: True}) if head else TINY
        bad = header_only(tmp_path / f"{head}.safetensors", architecture=architecture,
                          provenance={"verdict": {"unsure_below": 0.3, "bird_below": 5}})
        with pytest.raises(ValueError, match="verdict bird_below must be"):
            read_metadata(bad)


def test_metadata_that_is_not_an_object_is_no_checkpoint_of_ours(tmp_path):
    path = tmp_path / "m.safetensors"
    data = json.dumps({"__metadata__": ["resnext"]}).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)
    with pytest.raises(ValueError) as err:
        read_metadata(path)
    assert str(err.value) == f"{path}: safetensors file has no 'resnext' metadata; not a checkpoint of this project"


@pytest.mark.parametrize("body, detail", [
    (b"[1, 2]", "not a safetensors file (header is not a JSON object)"),
    (b"\xff\xfe", "not a safetensors file (header is not JSON we accept:"),
])
def test_a_header_that_is_no_json_object_is_named(tmp_path, body, detail):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ValueError) as err:
        read_metadata(path)
    assert str(err.value).startswith(f"{path}: {detail}")


def test_header_length_limits(tmp_path, monkeypatch):
    """A header as long as the limit is read; one byte more, or longer than the file, is refused;
    a length with the top bit set is a huge unsigned number, not a negative one."""
    import resnext.checkpoint as ck

    path = header_only(tmp_path / "m.safetensors")
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    monkeypatch.setattr(ck, "MAX_HEADER_BYTES", length)
    assert read_metadata(path).classes == CLASSES
    monkeypatch.setattr(ck, "MAX_HEADER_BYTES", length - 1)
    with pytest.raises(ValueError, match=f"header claims {length:,} bytes"):
        read_metadata(path)
    monkeypatch.undo()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1])  # one byte short of its declared header
    with pytest.raises(ValueError, match=f"header claims {length:,} bytes; the file has {length + 7:,}"):
        read_metadata(cut)
    signed = tmp_path / "signed.safetensors"
    signed.write_bytes(struct.pack("<Q", 2**63 + 5) + b"{}")
    with pytest.raises(ValueError, match="header claims more bytes than the file holds") as err:
        read_metadata(signed)
    assert not re.search(r"\d{7}", str(err.value).replace(",", "").split(": ", 1)[1])  # no 19-digit length
