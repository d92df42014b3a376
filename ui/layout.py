"""The page: a header, the three tabs, the public API, and the page-load step that finds the
visitor's own models again."""

from __future__ import annotations

import secrets

import gradio as gr

from . import api, classify_tab, finetune_tab, model_tab
from .context import Ctx, header, species_list
from .state import Models

THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
.small-print {font-size: 0.8em; opacity: 0.75}
.unsure {border-left: 4px solid #e8a33d; padding-left: 8px; margin: 4px 0}
#train-status progress {width: 100%; height: 12px; accent-color: #3b82f6}
#batch-table {max-width: 100%; overflow-x: auto}
#model-card table, #train-report table {display: block; overflow-x: auto; white-space: nowrap}
.top3-tile img {object-fit: contain}
#overlay img {width: 100%; height: 100%; object-fit: contain}  /* small photos fill the answer's frame */
/* Gradio sizes the grid by the photos it has: one example filled the column. Five a row here,
   four on a phone (five of 100 px each scrolled sideways there, hiding four with no cue). */
#example-gallery .grid-container {grid-template-columns: repeat(5, minmax(0, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important}
/* Photo grids (the examples, a run's validation photos): each name under its photo, whole; over it,
   "Carolina W..." hid most of a name and of the bird. Only as tall as the photos. */
.photo-grid .grid-container {padding-top: 0 !important}
.photo-grid, .photo-grid .grid-wrap {min-height: 0 !important; height: auto !important; max-height: none !important}
.photo-grid .thumbnail-item {aspect-ratio: auto !important; height: auto !important; display: flex;
  flex-direction: column; overflow: visible}
.photo-grid .thumbnail-item img {aspect-ratio: 1; width: 100%; height: auto; object-fit: cover}
.photo-grid .caption-label {position: static !important; max-width: 100% !important; white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; background: none !important; border: none !important;
  box-shadow: none !important; padding: 2px 0 0 0 !important; margin: 0 !important; text-align: center;
  line-height: 1.2; font-size: 0.8em}
/* A label above its picture, not a badge over it (it hid the bird's head on the heatmap, and most
   of a reference photo on a phone). */
.static-label {height: auto !important}
.static-label label.float {position: static !important; margin: 0 0 4px 0}
#per-class th, #per-class td, #per-class th *, #per-class td * {word-break: normal !important; overflow-wrap: normal !important}
.tile-caption {text-align: center; font-size: 0.9em}
@media (max-width: 640px) {
  h1 {font-size: 1.3em}
  [id^=ref-] label.float {font-size: 0.7em; padding: 1px 4px}
  [id^=ref-] label.float svg {display: none}
  /* wider than a phone, scrolled sideways, so no word breaks letter by letter ("no t su re") */
  #batch-table .table-container {overflow-x: auto}
  #batch-table .table-wrap {min-width: 620px; font-size: 0.8em}
  #batch-table td, #batch-table th, #batch-table td * {word-break: normal !important; overflow-wrap: normal !important}
  #example-gallery .grid-container {grid-template-columns: repeat(4, minmax(0, 1fr)) !important}
  .photo-grid .caption-label {font-size: 0.7em}
  #photo, #overlay {max-height: 320px}
}
"""
# A click on the photo marks the first corner at once, and the second draws the box, before the
# answer comes back (the server keeps the box; this only shows it). A new photo, or "Use the whole
# photo", clears the marks. And the class box selects its text when entered.
PAGE_JS = """() => {
  if (window.boxMarks) return; window.boxMarks = true;
  let first = null;
  const clear = () => { document.querySelectorAll('.box-mark').forEach(m => m.remove()); first = null; };
  const mark = (frame, style) => {
    const m = document.createElement('div');
    m.className = 'box-mark';
    Object.assign(m.style, {position: 'absolute', pointerEvents: 'none', border: '2px solid #16a34a',
                            boxShadow: '0 0 0 1px white', zIndex: 5}, style);
    frame.appendChild(m);
  };
  // Typing in "Explain which class" replaces its text (it appended to "Top-1 prediction" and found nothing).
  document.addEventListener('focusin', (e) => { if (e.target.matches('#target input')) e.target.select(); });
  document.addEventListener('click', (e) => {
    if (e.target.closest('#clear-box')) { clear(); return; }
    const img = e.target.closest('#photo img');
    if (!img || !img.naturalWidth) return;
    // Gradio answers a click only on the picture, not on the margins object-fit leaves around it:
    // no mark there either (one appeared, and the box never completed).
    const r = img.getBoundingClientRect();
    const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    const w = img.naturalWidth * s, h = img.naturalHeight * s, l = r.left + (r.width - w) / 2, t = r.top + (r.height - h) / 2;
    if (e.clientX < l || e.clientX > l + w || e.clientY < t || e.clientY > t + h) return;
    const frame = img.parentElement;
    if (getComputedStyle(frame).position === 'static') frame.style.position = 'relative';
    const f = frame.getBoundingClientRect(), x = e.clientX - f.left, y = e.clientY - f.top;
    if (!first || first.src !== img.src) {
      clear();
      first = {x, y, src: img.src};
      mark(frame, {left: x - 7 + 'px', top: y - 7 + 'px', width: '10px', height: '10px', borderRadius: '50%'});
    } else {
      mark(frame, {left: Math.min(first.x, x) + 'px', top: Math.min(first.y, y) + 'px', borderStyle: 'dashed',
                   width: Math.abs(x - first.x) + 'px', height: Math.abs(y - first.y) + 'px'});
      first = null;
    }
  }, true);
  new MutationObserver((changes) => {
    const ours = (n) => n.classList && n.classList.contains('box-mark');
    if (changes.some(c => c.type === 'attributes' ||
        [...c.addedNodes, ...c.removedNodes].some(n => !ours(n)))) clear();
  }).observe(document.querySelector('#photo'), {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""

# Gradio encrypts a BrowserState in the browser with a key it sends to the browser: a fixed label,
# not a secret. What is stored there is the visitor's own token and the server's signature of it.
BROWSER_STATE_LABEL = "resnext-visitor-v2"


def build_demo(registry: Models, key: bytes | None = None) -> gr.Blocks:
    """The app's Blocks, built without launching. ``key`` signs visitors' tokens (a random one
    per start if not given: a restart then forgets who owns which model); it never leaves the server."""
    ctx = Ctx(registry, key or secrets.token_bytes(32))
    # No Gradio delete_cache: Models.tidy ages the same cache out (an hour), but never the example
    # photos' copies, which Gradio's pass removed an hour after start (and ours, taking their dates
    # from the assets, within minutes): every example was then a broken image (403).
    with gr.Blocks(title="ResNeXt bird classifier") as demo:
        ctx.session = gr.State(None)
        ctx.model_name = gr.State(registry.default)
        ctx.remembered = gr.BrowserState({"owner": None, "sig": None, "model": None}, storage_key="resnext-visitor",
                                         secret=BROWSER_STATE_LABEL)
        ctx.header = gr.Markdown(header(registry.get(registry.default), registry.default, shipped=True), elem_id="header")
        with gr.Accordion("Which species does it know?", open=False, elem_id="species-box"):
            ctx.species = gr.Markdown(species_list(registry.get(registry.default).classes), elem_id="species-list")
        with gr.Tab("Classify"):
            classify = classify_tab.build(ctx)
        with gr.Tab("Fine-tune"):
            fine_tune = finetune_tab.build(ctx)
        with gr.Tab("Model"):
            picker, upload = model_tab.build(ctx)
        classify_tab.wire(ctx, classify)  # first: the others re-run its answer after a model change
        finetune_tab.wire(ctx, fine_tune)
        model_tab.wire(ctx, picker, upload)
        api.register(ctx, classify, fine_tune)
        demo.load(ctx.restore, ctx.remembered, ctx.selection_outputs(), api_visibility="private")
        demo.load(None, js=PAGE_JS)
    return demo
