"""Training-set cleansing: find and remove the poisoned images of a training set, through a model trained on
it (ALGORITHMS.md D11–D14), behind one interface addressed by name.

Example::

    import torch
    from guard.cleanse import create_cleanser
    result = create_cleanser("ac").cleanse(model, suspect_set, generator=torch.Generator().manual_seed(0))
    result.detected, result.target_class, result.removed, result.statistic
    clean_set = result.cleansed(suspect_set)          # retrain on this with guard.train.train
    result.save("report.json")                        # guard archive --scan report.json serves the verdict

Registered: ``re`` Xiang et al.'s reverse engineering, ``ss`` Spectral Signatures, ``ac`` Activation
Clustering, ``ci`` Cluster Impurity.
"""

from .base import (REPORT_KIND, CleanseConfig, CleanseResult, Cleanser, FeatureSet, check_training_set,
                   cleanser_from_dict, create_cleanser, describe_cleansers, extract_features, get_cleanser,
                   list_cleansers, register_cleanser, suspect_from_record)
from .clustering import (REDUCTIONS, ActivationClustering, ActivationClusteringConfig, ClusterImpurity,
                         ClusterImpurityConfig, box_blur)
from .reverse import (REMOVAL_TARGETS, REMOVALS, PairPatterns, ReverseEngineering, ReverseEngineeringConfig,
                      margin_drops, margin_removal, order_statistic_test, removal_scale, source_classes,
                      subtracted_labels, subtraction_removal)
from .spectral import SpectralSignatures, SpectralSignaturesConfig

__all__ = ["ActivationClustering", "ActivationClusteringConfig", "CleanseConfig", "CleanseResult", "Cleanser",
           "ClusterImpurity", "ClusterImpurityConfig", "FeatureSet", "PairPatterns", "REDUCTIONS", "REMOVAL_TARGETS",
           "REMOVALS", "REPORT_KIND", "ReverseEngineering", "ReverseEngineeringConfig", "SpectralSignatures",
           "SpectralSignaturesConfig",
           "box_blur", "check_training_set", "cleanser_from_dict", "create_cleanser", "describe_cleansers",
           "extract_features", "get_cleanser", "list_cleansers", "margin_drops", "margin_removal",
           "order_statistic_test", "register_cleanser", "removal_scale", "source_classes", "subtracted_labels",
           "subtraction_removal", "suspect_from_record"]
