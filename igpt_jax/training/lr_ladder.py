"""The paper's sequential learning-rate search (section 3.4) as a pure rule, and its table and plot.

"We sequentially try the learning rates 0.01, 0.003, 0.001, 0.0003, ..., stopping at the first local minimum."
`search` tries a descending ladder of learning rates one at a time through a trial runner (the lr_search job runs
a short pretraining; tests inject scripted losses) and stops at the first rise of the final validation loss: when
the loss at lr_{i+1} is above the loss at lr_i (finite), lr_i is the first local minimum and is picked. A trial
that diverged (NaN/Inf loss) counts as +inf, so divergence at the top of the ladder is passed over and divergence
after a finite loss is a rise. If the ladder ends while the loss still falls, the last (smallest) learning rate is
picked and the outcome says so; if every trial diverged, nothing is picked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from igpt_jax.reports import plots

# Why the search stopped.
LOCAL_MINIMUM = "local_minimum"  # the loss rose after the picked lr
LADDER_END = "ladder_end"  # the ladder ended while the loss still fell: the smallest lr is picked
ALL_DIVERGED = "all_diverged"  # every trial diverged: nothing picked
INTERRUPTED = "interrupted"  # a trial was preempted: rerun the same command to resume


@dataclasses.dataclass
class Trial:
    """One short pretraining run of the search.

    Attributes:
      lr: its peak learning rate.
      steps: its optimizer steps.
      val_loss: final validation loss in nats/token; +inf when it diverged.
      seconds: wall-clock seconds it ran (over all its segments, when it was resumed).
      status: 'finished' or 'diverged'.
      reused: read back from an earlier run of the search rather than run now.
    """

    lr: float
    steps: int
    val_loss: float
    seconds: float
    status: str = "finished"
    reused: bool = False


@dataclasses.dataclass
class Outcome:
    """The trials run in ladder order, the picked learning rate (None: none) and why the search stopped."""

    trials: list[Trial]
    picked_lr: float | None
    stop: str

    @property
    def note(self) -> str:
        """One sentence on the picked learning rate and how far to trust it."""
        lrs = [t.lr for t in self.trials]
        if self.stop == INTERRUPTED:
            return f"interrupted after {len(self.trials)} finished trial(s): run the same command again to resume"
        if self.stop == ALL_DIVERGED:
            return f"every trial diverged, down to lr {lrs[-1]:g}: extend lr_search.lrs below it"
        if self.stop == LADDER_END:
            return (f"the ladder ended while the validation loss still fell: picked its smallest lr {lrs[-1]:g}; "
                    "extend lr_search.lrs below it to find the minimum")
        if self.picked_lr == lrs[0]:
            return (f"picked lr {self.picked_lr:g}, the ladder's largest: the loss rose at {lrs[1]:g}, but no "
                    "larger lr was tried")
        return f"picked lr {self.picked_lr:g}: the first local minimum of the validation loss"


def first_rise(losses: Sequence[float]) -> int | None:
    """The first index i >= 1 whose loss is above the finite loss before it (NaN counts as +inf); None if none."""
    values = [_loss(x) for x in losses]
    for i in range(1, len(values)):
        if math.isfinite(values[i - 1]) and values[i] > values[i - 1]:
            return i
    return None


def search(lrs: Sequence[float], run_trial: Callable[[int, float], Trial | None]) -> Outcome:
    """Runs trials down the ladder until the first local minimum of the validation loss.

    Args:
      lrs: learning rates, strictly descending.
      run_trial: (index, lr) -> the finished `Trial`, or None when the trial was interrupted (preempted): the
        search then stops without a pick.

    Returns:
      The `Outcome`: the trials run (up to and including the one whose loss rose), the pick and the reason.
    """
    trials: list[Trial] = []
    for i, lr in enumerate(lrs):
        trial = run_trial(i, float(lr))
        if trial is None:
            return Outcome(trials, None, INTERRUPTED)
        trials.append(trial)
        rise = first_rise([t.val_loss for t in trials])
        if rise is not None:
            return Outcome(trials, trials[rise - 1].lr, LOCAL_MINIMUM)
    if all(not math.isfinite(_loss(t.val_loss)) for t in trials):
        return Outcome(trials, None, ALL_DIVERGED)
    return Outcome(trials, trials[-1].lr, LADDER_END)


def _loss(x: float | None) -> float:
    return math.inf if x is None or not math.isfinite(float(x)) else float(x)


def table(outcome: Outcome) -> str:
    """The trials as a text table (lr, steps, final validation loss, time), the pick marked, and the note."""
    lines = [f"{'lr':>9}  {'steps':>7}  {'val loss':>9}  {'time':>9}", "-" * 44]
    for t in outcome.trials:
        loss = f"{t.val_loss:9.4f}" if math.isfinite(_loss(t.val_loss)) else f"{'diverged':>9}"
        mark = "<- picked" if t.lr == outcome.picked_lr else ""
        lines.append(f"{t.lr:>9g}  {t.steps:>7d}  {loss}  {_duration(t.seconds):>9}  {mark}".rstrip())
    lines.append(outcome.note)
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def plot(path: str, outcome: Outcome, *, title: str = "") -> None:
    """Final validation loss against learning rate (log x), the picked lr labelled; diverged trials named in the
    title (they have no point)."""
    trials = outcome.trials
    diverged = [f"{t.lr:g}" for t in trials if not math.isfinite(_loss(t.val_loss))]
    title = title or "Learning-rate search (paper 3.4)"
    if diverged:
        title += f"; diverged: {', '.join(diverged)}"
    plots.line_chart(
        path,
        series=[{"x": [t.lr for t in trials], "y": [_loss(t.val_loss) for t in trials],
                 "label": "final validation loss",
                 "labels": [f"picked {t.lr:g}" if t.lr == outcome.picked_lr else "" for t in trials]}],
        title=title, xlabel="peak learning rate", ylabel="validation loss (nats/token)", log_x=True,
        point_labels=True,
    )
