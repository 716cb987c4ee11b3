"""The PyTorch reference of Memory Mosaics v2: config, network, streaming state, checkpoints."""

from mosaicrt.model.checkpoint import load_model, random_model, save_checkpoint, write_checkpoint
from mosaicrt.model.config import PRESETS, ModelConfig, load_config, preset, save_config
from mosaicrt.model.mmv2 import MMv2
from mosaicrt.model.state import DecodeState, MemoryPlan, memory_plan

__all__ = [
    "PRESETS",
    "DecodeState",
    "MMv2",
    "MemoryPlan",
    "ModelConfig",
    "load_config",
    "load_model",
    "memory_plan",
    "preset",
    "random_model",
    "save_checkpoint",
    "save_config",
    "write_checkpoint",
]
