"""Runtime: backends behind one API, the decode state they own, batched scoring and generation."""

from mosaicrt.runtime.generator import RunLimits, generate, score
from mosaicrt.runtime.sampling import SamplingParams

__all__ = ["RunLimits", "SamplingParams", "generate", "score"]
