"""Model-level backdoor detection behind one interface (:class:`Detector`: a frozen config and one verb,
``scan(model, trusted, heldout)``), addressed by name: ``cnc`` — Calibrated Trigger Inversion (ALGORITHMS.md
D3), ``nc`` — Neural Cleanse (D4). Also the batched trigger inversion engine they share
(:mod:`guard.detect.inversion`), MOTH's class distance of every ordered class pair (:class:`ClassDistance`,
M12), the scan report, and the per-request scorer the serving handler uses. Per-input detection behind its own
interface (:class:`InputDetector`: ``fit(model, clean)``, ``score(images)``): ``strip``, ``scale-up``, ``teco``,
``ibd-psc`` and guard's ``rescaler`` score (:mod:`guard.detect.inputs`), which the endpoint serves calibrated as
:class:`TriggerDetector`.

Example::

    from guard.detect import create_detector, list_detectors
    scan = create_detector("cnc").scan(model, trusted, heldout, generator=torch.Generator().manual_seed(0))
    scan.report.save("report.json"); scan.report.summary; scan.trigger_image(c)
"""

from .base import (Detector, MADResult, ScanReport, ScanResult, calibrate_threshold, create_detector,
                   describe_detectors, get_detector, list_detectors, mad_anomaly_index, register_detector,
                   register_report_method, report_methods, save_trigger_png, separation_index)
from .corruptions import CORRUPTIONS, Corruptions
from .cnc import CalibratedTriggerInversion, CNCConfig
from .distance import ClassDistance, ClassDistanceConfig, DistanceResult
from .inversion import (AdditiveTrigger, CostSchedule, FixedSteps, InversionConfig, InversionResult, InversionTask,
                        LogSurrogate, MaskPatternTrigger, Objective, TargetCrossEntropy, TriggerForm, TriggeredBatch,
                        UntilSuccess, apply_mask_pattern, class_tasks, frozen, invert, pair_tasks, tanh_bounded)
from .inputs import (COMBINE, FEATURE_LAYERS, IBDPSC, Amplification, amplify_batchnorm, consistency, label_log_odds,
                     PENULTIMATE, STRIP, LayerGaussian, class_gaussians, combined, feature_layers,
                     fit_layer_gaussians, layer_features, layered_score, mahalanobis, IBDPSCConfig, InputDetector,
                     ReScalerScore, ReScalerScoreConfig, ScaleUp,
                     ScaleUpConfig, STRIPConfig, TeCo, TeCoConfig, create_input_detector, describe_input_detectors,
                     get_input_detector, list_input_detectors, register_input_detector)
from .neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from .serving import RequestScorer, RequestScores, TriggerDetector, TriggerScores

__all__ = ["CORRUPTIONS", "Corruptions", "IBDPSC", "IBDPSCConfig", "InputDetector", "ReScalerScore",
           "ReScalerScoreConfig", "STRIP", "STRIPConfig", "ScaleUp", "ScaleUpConfig", "TeCo", "TeCoConfig",
           "create_input_detector", "describe_input_detectors", "get_input_detector",
           "list_input_detectors", "register_input_detector", "FEATURE_LAYERS", "PENULTIMATE",
           "LayerGaussian", "class_gaussians", "feature_layers",
           "COMBINE", "combined", "Amplification", "amplify_batchnorm", "consistency", "label_log_odds",
           "fit_layer_gaussians", "layer_features", "layered_score", "mahalanobis",
           "TriggerDetector", "TriggerScores",
           "AdditiveTrigger", "CNCConfig", "CalibratedTriggerInversion", "ClassDistance", "ClassDistanceConfig",
           "CostSchedule", "Detector", "DistanceResult", "FixedSteps",
           "InversionConfig", "InversionResult", "InversionTask", "LogSurrogate", "MADResult", "MaskPatternTrigger",
           "NeuralCleanse", "NeuralCleanseConfig", "Objective", "RequestScorer", "RequestScores", "ScanReport",
           "ScanResult", "TargetCrossEntropy", "TriggerForm", "TriggeredBatch", "UntilSuccess", "apply_mask_pattern",
           "calibrate_threshold", "class_tasks", "create_detector", "describe_detectors", "frozen", "get_detector",
           "invert", "list_detectors", "mad_anomaly_index", "pair_tasks", "register_detector", "register_report_method",
           "report_methods", "save_trigger_png",
           "separation_index", "tanh_bounded"]
