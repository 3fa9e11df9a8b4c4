"""Model-level backdoor detection: Calibrated Trigger Inversion (CNC) and Neural Cleanse (NC), the batched
trigger inversion engine they share (:mod:`guard.detect.inversion`), the scan report they write, and the
per-request scorer the serving handler uses.

Example::

    from guard.detect import CalibratedTriggerInversion, NeuralCleanse
    cnc = CalibratedTriggerInversion().scan(model, trusted, heldout, generator=torch.Generator().manual_seed(0))
    cnc.report.save("report.json")
"""

from .cnc import CalibratedTriggerInversion, CNCConfig, CNCResult, calibrate_threshold
from .inversion import (AdditiveTrigger, CostSchedule, FixedSteps, InversionConfig, InversionResult, InversionTask,
                        LogSurrogate, MaskPatternTrigger, Objective, TargetCrossEntropy, TriggerForm, TriggeredBatch,
                        UntilSuccess, apply_mask_pattern, class_tasks, frozen, invert, pair_tasks, tanh_bounded)
from .neural_cleanse import MADResult, NCResult, NeuralCleanse, NeuralCleanseConfig, mad_anomaly_index
from .report import ScanReport, save_trigger_png
from .serving import RequestScorer, RequestScores

__all__ = ["AdditiveTrigger", "CNCConfig", "CNCResult", "CalibratedTriggerInversion", "CostSchedule", "FixedSteps",
           "InversionConfig", "InversionResult", "InversionTask", "LogSurrogate", "MADResult", "MaskPatternTrigger",
           "NCResult", "NeuralCleanse", "NeuralCleanseConfig", "Objective", "RequestScorer", "RequestScores",
           "ScanReport", "TargetCrossEntropy", "TriggerForm", "TriggeredBatch", "UntilSuccess", "apply_mask_pattern",
           "calibrate_threshold", "class_tasks", "frozen", "invert", "mad_anomaly_index", "pair_tasks",
           "save_trigger_png", "tanh_bounded"]
