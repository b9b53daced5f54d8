"""Attention relations (MiniLMv2 / BitDistill) from the Q, K, V projections of one transformer layer.

For relation type j in (Q-Q, K-K, V-V) and the n scored tokens of one sample:

    A_j      [n, width_j]        output of the layer's q_proj / k_proj / v_proj for those tokens
    A_j,h    [n, d_r]            A_j re-split into A_r relation heads, d_r = width_j / A_r
    R_j,h    [n, n]              softmax(A_j,h A_j,hᵀ / √d_r) over the last axis

and the result stacks them as [3, A_r, n, n]. Teacher and student may have different projection widths (and
K/V widths differ from Q under grouped-query attention); only A_r must match between them.

The capture hooks read the raw projection outputs: BEFORE rotary position embedding and BEFORE any per-head
q_norm / k_norm (Qwen3, Gemma3). That is the MiniLMv2 definition (relations of the linear projections) and it
is independent of how an attention implementation applies RoPE, so eager/sdpa/flash all give the same values.
The scored tokens are the answer tokens themselves (positions tp), not the predicting positions tp - 1.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kd.errors import TeacherConfigError

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj")


def relation_matrices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Q-Q, K-K and V-V relation softmaxes of one sample; differentiable (reused on the student side).

    q: [n, width_q], k: [n, width_k], v: [n, width_v] projection outputs of the n span tokens.
    Returns [3, A_r, n, n] in the input dtype (computed in fp32 when the input is reduced precision); each
    row sums to 1. Raises TeacherConfigError if a width is not divisible by num_heads (= A_r).
    """
    relations = []
    for name, projection in zip(PROJECTION_NAMES, (q, k, v)):
        if projection.dim() != 2:
            raise ValueError(f"{name} output must be [n, width], got shape {tuple(projection.shape)}")
        num_tokens, width = projection.shape
        if width % num_heads:
            raise TeacherConfigError(
                f"relations.num_heads={num_heads} does not divide the {name} width {width}; "
                f"pick a divisor of {width}"
            )
        head_width = width // num_heads
        compute = projection.float() if projection.dtype in (torch.float16, torch.bfloat16) else projection
        heads = compute.reshape(num_tokens, num_heads, head_width).transpose(0, 1)  # [A_r, n, d_r]
        scores = heads @ heads.transpose(1, 2) / math.sqrt(head_width)  # [A_r, n, n]
        relations.append(scores.softmax(dim=-1).to(projection.dtype))
    return torch.stack(relations)  # [3, A_r, n, n]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (model.model.layers for Llama/Qwen/Gemma-style models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TeacherConfigError(
            f"cannot find the transformer layers of {type(model).__name__} (expected .model.layers); "
            "attention relations are not supported for this architecture"
        )
    return layers


def projection_modules(model: nn.Module, layer: int, num_heads: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(q_proj, k_proj, v_proj) modules of `layer` (negative counts from the end); validates A_r divisibility."""
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise TeacherConfigError(
            f"teacher.relations.layer={layer} is out of range for a model with {len(layers)} layers; "
            f"use -{len(layers)}..{len(layers) - 1}"
        )
    block = layers[layer]
    found = {}
    for module_name, module in block.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in PROJECTION_NAMES and leaf not in found:
            found[leaf] = module
    missing = [name for name in PROJECTION_NAMES if name not in found]
    if missing:
        raise TeacherConfigError(
            f"layer {layer} of {type(model).__name__} has no {', '.join(missing)} module(s); attention "
            "relations need separate q_proj/k_proj/v_proj linears"
        )
    for name in PROJECTION_NAMES:
        width = found[name].out_features
        if width % num_heads:
            raise TeacherConfigError(
                f"teacher.relations.num_heads={num_heads} does not divide the {name} width {width} of layer "
                f"{layer}; pick a common divisor of the q/k/v widths"
            )
    return found["q_proj"], found["k_proj"], found["v_proj"]


@contextmanager
def capture_projections(modules: tuple[nn.Module, nn.Module, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store the latest outputs [B, T, width] of q/k/v_proj under 'q_proj', 'k_proj', 'v_proj'."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in zip(PROJECTION_NAMES, modules):

        def store(_module, _inputs, output, name=name):
            captured[name] = output

        handles.append(module.register_forward_hook(store))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
