"""cached-kd: offline knowledge distillation from cached teacher logits (CLI, configs, orchestration)."""

import logging as _logging

# torchao (imported by vLLM and by the quantized student modes) warns on every import about optional CUDA
# kernels a CPU build cannot load, and torch about torchao's enum registration: noise in every run's output,
# nothing a user can act on. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
