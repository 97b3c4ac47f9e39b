"""Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
anything imports Triton (torch.compile does): set it here, before the test modules load."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
