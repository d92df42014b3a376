"""A run's schedule, by epochs or by the clock.

With ``config.minutes`` the run trains for that many minutes whatever the hardware: the warm-up
and the cosine decay of the learning rate follow the fraction of the time gone, so the schedule
ends, at a learning rate of zero, when the time is up (on an H200 or on two CPU cores alike). The
time counts from the first training step (the teacher's probe and decoding the photos come
before it). The run is judged on its validation photos about every 1/20 of the time and at the
end, and its snapshot written every :data:`SNAPSHOT_S` seconds and at the end. Without it, the
run is ``config.epochs`` epochs, each judged and snapshotted, as always.
"""

from __future__ import annotations

import math
import time

from .context import lr_factor

__all__ = ["Clock", "SNAPSHOT_S", "JUDGEMENTS"]

SNAPSHOT_S = 180.0  # a clock run's snapshot at most this often: a crash loses at most 3 minutes
JUDGEMENTS = 20  # a clock run is judged about this many times (and at its end)


class Clock:
    def __init__(self, config, steps_per_epoch: int, now=time.perf_counter):
        self.budget = config.minutes * 60 if config.minutes else None
        self.epochs_n, self.per_epoch, self.now = config.epochs, steps_per_epoch, now
        self.total = config.epochs * steps_per_epoch
        self.warmup = min(0.25, config.warmup_epochs / config.epochs)  # as a fraction of the run
        self.step = self.seen = 0
        self.t0 = None
        self.done = False
        self.judged = self.snapped = -math.inf

    def elapsed(self) -> float:
        return self.now() - self.t0 if self.t0 is not None else 0.0

    def fraction(self) -> float:
        """How much of the schedule is behind us, 0..1."""
        if self.budget:
            return min(1.0, self.elapsed() / self.budget)
        return self.step / self.total

    def lr_factor(self) -> float:
        if not self.budget:
            return lr_factor(self.step, self.total, int(self.warmup * self.total))
        f = self.fraction()
        if f < self.warmup:
            return max(f / self.warmup, 0.01)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (f - self.warmup) / (1 - self.warmup))))

    def epochs(self):
        epoch = 0
        while not self.done:
            epoch += 1
            if not self.budget and epoch > self.epochs_n:
                return
            yield epoch

    def steps(self):
        if self.t0 is None:
            self.t0 = self.now()
        for s in range(self.per_epoch):
            if self.budget and s and self.fraction() >= 1:  # every epoch begun takes at least one step
                break
            yield s
        if self.budget and self.fraction() >= 1:
            self.done = True

    def tick(self, images: int) -> None:
        self.step += 1
        self.seen += images

    def judge_now(self) -> bool:
        """Judge the run now (at the end of an epoch)?"""
        if self.budget and not self.done and self.elapsed() - self.judged < self.budget / JUDGEMENTS:
            return False
        self.judged = self.elapsed()
        return True

    def snapshot_now(self) -> bool:
        if self.budget and not self.done and self.elapsed() - self.snapped < SNAPSHOT_S:
            return False
        self.snapped = self.elapsed()
        return True

    def rate(self) -> float:
        return self.seen / max(1e-9, self.elapsed())

    def steps_estimate(self) -> int:
        if not self.budget:
            return self.total
        f = self.fraction()
        return max(self.step, round(self.step / f)) if f > 0 else self.step

    def epochs_estimate(self) -> int:
        return self.epochs_n if not self.budget else max(1, math.ceil(self.steps_estimate() / self.per_epoch))

    def eta(self) -> float | None:
        if self.budget:
            return max(0.0, self.budget - self.elapsed())
        return self.elapsed() / self.step * (self.total - self.step) if self.step else None
