"""Student models: loading and the distillation forward, the training-mode registry, LoRA/full, quantized, ternary."""
