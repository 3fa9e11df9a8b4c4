"""ReScaler (rescaler_main.txt §3) and the block-adapter registry that says where its scalars sit."""

from .adapters import BlockSites, ScalarSite, find_blocks, find_stages, register_block, registered_blocks
from .core import Adaptation, ReScaler, ReScalerConfig, overlap_similarity

__all__ = ["Adaptation", "BlockSites", "ReScaler", "ReScalerConfig", "ScalarSite", "find_blocks",
           "find_stages", "overlap_similarity", "register_block", "registered_blocks"]
