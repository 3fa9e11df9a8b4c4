"""Model defenses — repairs of a suspected model and hardening before serving — behind one interface
(:class:`Defense`: a frozen config and one verb, ``defend(model, trusted, eval_set=...)``), addressed by name.

* ``pivotal`` — Pivotal Tuning with SLOL (pick_your_poison.txt Algorithm 3; ALGORITHMS.md D2).
* ``nc`` — Neural Cleanse unlearning (ALGORITHMS.md D4); ``nc-pyp`` — as Pick your Poison runs it
  (additive triggers, unlearning on alternate batches; Algorithm 6).
* ``moth`` — MOTH class-distance hardening before serving (moth_supplementary.txt; ALGORITHMS.md D9).
* ``fine-tune``, ``weight-decay`` — fine-tuning baselines, without and with an L2 penalty (D16, D15).
* ``fine-pruning`` — prune the last layer's dormant channels, then fine-tune (Liu et al. 2018; D5).
* ``anp`` — Adversarial Neuron Pruning: BatchNorm neuron masks under adversarial noise (Wu & Wang 2021; D7).
* ``nad`` — Neural Attention Distillation from a fine-tuned teacher (Li et al. 2021; D6).
* ``mcr`` — Mode Connectivity Repair: a point on a Bézier curve to the fine-tuned model (Zhao et al. 2020; D8).

Every defense returns a :class:`RepairResult` with a *copy* of the model and its (CDA, ASR) history, and runs
the trusted-data fine-tuning protocol :func:`trusted_finetune` (ALGORITHMS.md P4) on the one training loop.

Example::

    from guard.repair import create_defense, list_defenses, split_trusted
    trusted = split_trusted(train_set, 0.01, torch.Generator().manual_seed(0))
    result = create_defense("pivotal").defend(model, trusted, eval_set=heldout,
                                              generator=torch.Generator().manual_seed(0))
    json.dumps(result.to_dict()); result.model
"""

# the order matters: the detectors (imported by unlearning) import the Pivotal Tuning module
from .base import (AsrProbe, Defense, RepairPoint, RepairResult, create_defense, describe_defenses, get_defense,
                   list_defenses, register_defense)
from .finetune import TrustedTuningConfig, split_trusted, trusted_finetune
from .pivotal import PivotalTuning, PivotalTuningConfig, parameter_distance, slol
from .tuning import FineTuning, FineTuningConfig, WeightDecay, WeightDecayConfig
from .pruning import (ANP_THRESHOLDS, AdversarialNeuronPruning, AdversarialNeuronPruningConfig, FinePruning,
                      FinePruningConfig, channel_activations)
from .distillation import AttentionDistillation, AttentionDistillationConfig, attention_map
from .connectivity import ModeConnectivityConfig, ModeConnectivityRepair, bezier
from .unlearning import NeuralCleanseUnlearning, PypUnlearning, PypUnlearningConfig, UnlearningConfig
from .moth import Moth, MothConfig

__all__ = ["ANP_THRESHOLDS", "AdversarialNeuronPruning", "AdversarialNeuronPruningConfig", "AsrProbe",
           "AttentionDistillation", "AttentionDistillationConfig", "Defense", "FinePruning",
           "FinePruningConfig", "FineTuning", "FineTuningConfig", "ModeConnectivityConfig", "ModeConnectivityRepair",
           "Moth", "MothConfig", "NeuralCleanseUnlearning",
           "PivotalTuning", "PivotalTuningConfig", "PypUnlearning", "PypUnlearningConfig", "RepairPoint",
           "RepairResult", "TrustedTuningConfig",
           "UnlearningConfig", "WeightDecay", "WeightDecayConfig", "attention_map", "bezier", "channel_activations",
           "create_defense", "describe_defenses", "get_defense", "list_defenses", "parameter_distance",
           "register_defense", "slol", "split_trusted", "trusted_finetune"]
