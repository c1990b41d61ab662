"""Trained network baselines: ResNet18 from scratch and a finite-width Myrtle network.

* :func:`resnet18` is torchvision's ResNet18 with random initialisation (never
  pretrained weights); a stem for other than 3 input channels replaces ``conv1``.
* :class:`MyrtleNetwork` is the Myrtle definition of :mod:`neural_kernels.architectures`
  (one network of ``width`` channels, the same ``Serial.init``/``Serial.apply`` as the
  kernel estimate, ending with the finite layer of the kernels' final projection)
  followed by a trained linear readout: the thesis's "wide network".

:func:`train_network` trains either with SGD (momentum 0.9, weight decay 5e-4, a
per-step cosine or step schedule) on the train and validation splits of a prepared
dataset together, the thesis's training-set size (the kernels' refit protocol), for
the configured number of epochs, and reports the test accuracy of the final epoch.
Nothing is selected on validation, which is what lets it be trained on: the number
of epochs is a setting, and the default cosine schedule ends at a learning rate of
zero, where the final weights are the natural ones to report. Layout of its output
directory (``results/networks/<dataset>/<name>/``)::

    model.pt       the final weights and what rebuilds them (load_model)
    metrics.json   settings, per-epoch history, training size, test accuracy,
                   timings, device, peak memory (written last)

Per-epoch checkpoints live in ``.<name>.resume/`` beside the output directory, keyed
by a hash of the settings and the dataset: an interrupted run resumes after its last
finished epoch, a changed configuration starts afresh. Accuracies are fractions in
[0, 1].
"""

from neural_kernels.networks.data import (
    Augmentation,
    Normalizer,
    Split,
    channel_stats,
    load_splits,
    train_batches,
)
from neural_kernels.networks.models import MyrtleNetwork, build_model, resnet18
from neural_kernels.networks.stage import load_model, train_network
from neural_kernels.networks.training import evaluate, lr_factor, train_epoch
from neural_kernels.settings import TrainSettings

__all__ = [
    "Augmentation",
    "MyrtleNetwork",
    "Normalizer",
    "Split",
    "TrainSettings",
    "build_model",
    "channel_stats",
    "evaluate",
    "load_model",
    "load_splits",
    "lr_factor",
    "resnet18",
    "train_batches",
    "train_epoch",
    "train_network",
]
