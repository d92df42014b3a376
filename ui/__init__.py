"""The Gradio UI of the ResNeXt bird classifier: per-session state (:mod:`.state`), one module per
tab (:mod:`.classify_tab`, :mod:`.finetune_tab`, :mod:`.model_tab`) with the plain functions they
call (:mod:`.answers`, :mod:`.training`, :mod:`.card`), the public API (:mod:`.api`) and the
fixes to Gradio (:mod:`.fixes`, applied by :func:`install`). No tensor code here."""

from .fixes import install
from .layout import CSS, THEME, build_demo
from .state import Limits, Models, signing_key
from .uploads import UploadGuard

__all__ = ["CSS", "THEME", "Limits", "Models", "UploadGuard", "build_demo", "install", "signing_key"]
