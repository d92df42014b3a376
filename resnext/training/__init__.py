"""Training: fine-tuning (quick, full) and distillation from an ImageNet teacher.

One engine for the app's Fine-tune tab, the ``train`` command and the default model's recipe.
:func:`iter_train` is a generator of :class:`Progress` events (a terminal progress bar and the
Gradio UI both consume it) ending with the :class:`TrainResult`; :func:`train` runs it to the end.

- :mod:`.config`: what a run is told, reports and returns;
- :mod:`.context`: what every mode shares (the run's context, data, schedule, evaluation);
- :mod:`.quick`, :mod:`.full`, :mod:`.distill`: one module per mode;
- :mod:`.teacher`, :mod:`.augment`, :mod:`.calibrate`: the teacher, zoom-out and made-up
  non-photos, and the choice of verdict rules on held-out photos.

Serving code never imports this package.
"""

from .config import Progress, TrainConfig, TrainingCancelled, TrainResult
from .engine import iter_train, train
from .start import load_start_point

__all__ = ["Progress", "TrainConfig", "TrainResult", "TrainingCancelled", "iter_train", "load_start_point", "train"]
