"""The multi-head MLP of the task-incremental MNIST scenarios, an Avalanche
multi-task module."""
from __future__ import annotations

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule


class MultiHeadMLP(MultiTaskModule):
    """Two hidden layers of ``hidden_size`` ReLU units shared by all tasks, and
    one linear head per task label (Avalanche's MultiHeadClassifier, a new
    head for each new task): the multi-head MLP of Hsu et al. (2018)'s
    incremental-task scenario. No dropout (it would desynchronise data-parallel
    ranks)."""

    def __init__(self, input_size: int = 28 * 28, hidden_size: int = 400, initial_out_features: int = 2):
        super().__init__()
        self.input_size = input_size
        self.features = torch.nn.Sequential(torch.nn.Linear(input_size, hidden_size), torch.nn.ReLU(),
                                            torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU())
        self.classifier = MultiHeadClassifier(hidden_size, initial_out_features=initial_out_features)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.features(x.reshape(len(x), self.input_size)), task_label)

    def forward(self, x, task_labels):
        return self.classifier(self.features(x.reshape(len(x), self.input_size)), task_labels)
