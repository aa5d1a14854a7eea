"""secvec: fine-tune safety-aligned LLMs on possibly harmful data without learning the harm.

Security vectors (Zhou et al. 2023, arXiv 2311.02105): fit a LoRA "security vector" on harmful samples,
fine-tune the backbone with the vector active and frozen, then strip the vector.
"""

__version__ = "0.1.0"
