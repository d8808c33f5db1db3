"""moetune's Triton kernels for the MoE expert path (imported lazily by the triton backend).

grouped_gemm.py    row-grouped GEMM over expert-sorted rows: gather, split LoRA, bias,
                   activation (forward and backward) and weighted scatter fused
grouped_wgrad.py   K-grouped GEMM for the LoRA factor gradients
launch.py          repeated launches straight to the compiled kernel (less host time per launch)
activations.py     the gated activations as Triton device functions
cross_entropy.py   cross-entropy loss and gradient of one logits chunk, in place (moetune/linear_cross_entropy.py)
adamw.py           AdamW over a parameter group in one launch, bf16 moments (moetune/training/bf16_adamw.py)
"""

from .activations import act_code
from .grouped_gemm import grouped_gemm
from .grouped_wgrad import grouped_wgrad

__all__ = ["act_code", "grouped_gemm", "grouped_wgrad"]
