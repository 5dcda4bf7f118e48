"""A progress bar per experience for Avalanche's training loop."""
from __future__ import annotations

from avalanche.core import SupervisedPlugin


class ProgressBars(SupervisedPlugin):
    """A tqdm bar per experience, over its training iterations (off when not
    on a terminal, or when ``enabled`` is False)."""

    def __init__(self, enabled: bool, n_experiences: int):
        super().__init__()
        self.enabled, self.n_experiences, self.bar = enabled, n_experiences, None

    def before_training_exp(self, strategy, **kw):
        from tqdm.auto import tqdm

        total = len(strategy.dataloader) * strategy.train_epochs
        k = strategy.experience.current_experience
        self.bar = tqdm(total=total, desc=f"experience {k + 1}/{self.n_experiences}", unit="it", leave=False,
                        disable=None if self.enabled else True, dynamic_ncols=True)

    def after_training_iteration(self, strategy, **kw):
        if self.bar is not None:
            self.bar.update(1)

    def after_training_exp(self, strategy, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __getstate__(self):  # a checkpoint never holds a live bar
        return {**self.__dict__, "bar": None}
