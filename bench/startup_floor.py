"""The start-up floor of bench/throughput.py: what every tool pays before its own work.

    torchrun --standalone --nproc_per_node 2 -m bench.startup_floor
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the stages and the peers set it

import deepspeed  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
