"""Adapting a pretrained model: classification heads, finetuning strategies, LoRA, probes.

- :class:`Classifier`: a GPT/BERT config plus a pooled linear head in one parameter tree.
- :func:`strategy`: ``"full"``, ``"head"``, ``"last:N"``, ``"bitfit"``, ``"lora"`` or globs
  as a :func:`fnllm.tree.partition` filter; :func:`frozen_prefix` says how many bottom blocks
  stay frozen (and so can be computed once and cached).
- :mod:`fnllm.finetune.lora`: low-rank adapters as ordinary leaves of the tree; adapter sets
  (the whole trained part, head included, saved with a manifest) and peft folders both ways.
- :func:`extract_features`, :func:`linear_probe`, :func:`boosting_probe`: the feature-based way.
- :func:`predict`: logits (and labels) of shuffled, length-bucketed batches, in input order.
- :func:`accuracy`, :func:`macro_f1`, :func:`confusion_matrix`: classification metrics.
"""

from fnllm.finetune import lora
from fnllm.finetune.classifier import Classifier, Pooling, mean_pool
from fnllm.finetune.features import boosting_probe, extract_features, linear_probe
from fnllm.finetune.metrics import accuracy, confusion_matrix, macro_f1
from fnllm.finetune.prediction import Predictions, predict
from fnllm.finetune.strategies import NAMES, Strategy, frozen_prefix, strategy

__all__ = [
    "NAMES",
    "Classifier",
    "Pooling",
    "Predictions",
    "Strategy",
    "accuracy",
    "boosting_probe",
    "confusion_matrix",
    "extract_features",
    "frozen_prefix",
    "linear_probe",
    "lora",
    "macro_f1",
    "mean_pool",
    "predict",
    "strategy",
]
