"""Model defenses — repairs of a suspected model and hardening before serving — behind one interface
(:class:`Defense`: a frozen config and one verb, ``defend(model, trusted, eval_set=...)``), addressed by name.

* ``pivotal`` — Pivotal Tuning with SLOL (pick_your_poison.txt Algorithm 3; ALGORITHMS.md D2).
* ``nc`` — Neural Cleanse unlearning (ALGORITHMS.md D4).
* ``moth`` — MOTH class-distance hardening before serving (moth_supplementary.txt; ALGORITHMS.md D9).

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
from .finetune import split_trusted, trusted_finetune
from .pivotal import PivotalTuning, PivotalTuningConfig, parameter_distance, slol
from .unlearning import NeuralCleanseUnlearning, UnlearningConfig
from .moth import Moth, MothConfig

__all__ = ["AsrProbe", "Defense", "Moth", "MothConfig", "NeuralCleanseUnlearning", "PivotalTuning",
           "PivotalTuningConfig", "RepairPoint", "RepairResult", "UnlearningConfig", "create_defense",
           "describe_defenses", "get_defense", "list_defenses", "parameter_distance", "register_defense", "slol", "split_trusted", "trusted_finetune"]
