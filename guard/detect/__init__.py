"""Model-level backdoor detection: Calibrated Trigger Inversion (CNC) and Neural Cleanse (NC), the scan
report they write, and the per-request scorer the serving handler uses.

Example::

    from guard.detect import CalibratedTriggerInversion, NeuralCleanse
    cnc = CalibratedTriggerInversion().scan(model, trusted, heldout, generator=torch.Generator().manual_seed(0))
    cnc.report.save("report.json")
"""

from .cnc import CalibratedTriggerInversion, CNCConfig, CNCResult, calibrate_threshold
from .neural_cleanse import (MADResult, NCResult, NeuralCleanse, NeuralCleanseConfig, apply_mask_pattern,
                             mad_anomaly_index, tanh_bounded)
from .report import ScanReport, save_trigger_png
from .serving import RequestScorer, RequestScores

__all__ = ["CNCConfig", "CNCResult", "CalibratedTriggerInversion", "MADResult", "NCResult", "NeuralCleanse",
           "NeuralCleanseConfig", "RequestScorer", "RequestScores", "ScanReport", "apply_mask_pattern",
           "calibrate_threshold", "mad_anomaly_index", "save_trigger_png", "tanh_bounded"]
