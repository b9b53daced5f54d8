"""Ternary (BitNet b1.58) students: absmean ternary weights, 8-bit per-token activations, SubLN, 2-bit export.

Forward of a :class:`BitLinear` (Ma et al. 2024, "The Era of 1-bit LLMs", and its training-tips FAQ):

    Δ   = mean|W|                                   one fp32 scale per matrix (absmean)
    W_q = Δ · clamp(round(W / Δ), −1, 1)            values in {−Δ, 0, +Δ}
    x_q = per-token absmax int8 of x, dequantized   s = max|x_t| / 127, x_q = round(x_t / s) · s
    y   = x_q W_qᵀ

Both roundings use the straight-through estimator, ``a + (q(a) − a).detach()``: the forward sees the quantized
values, the backward the identity, so gradients reach the latent fp32 weights W. The scale and the quantizers
are torchao's BitNet pieces (``get_bitnet_scale``, ``quantize_bitnet_weight``, ``quantize_int8_rowwise``);
torchao's own ``BitNetTrainingConfig`` is not used because it swaps the weight for a tensor subclass that
neither peft, safetensors nor our checkpoints handle, and its int8 matmul path is written for CUDA.

SubLN (BitDistill, arXiv 2510.13998): an RMSNorm on the input of the attention output projection and of the
MLP down projection, i.e. just before the activations are quantized, so their scale is stable. It is a new
module (gain initialised to 1), which is why a SubLN student is saved in this module's own format.

Which layers: every nn.Linear inside the decoder blocks; the embeddings and the lm_head stay full precision
(as in BitNet b1.58).

Export: :func:`save_packed` writes 2-bit codes (4 per byte, code = t + 1 ∈ {0, 1, 2}) plus the fp32 Δ per
matrix, the other weights in a chosen dtype; :func:`load_packed` rebuilds a model whose :class:`PackedBitLinear`
layers compute exactly the ternary forward above.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.relations import decoder_layers

SUBLN_PROJECTIONS = ("o_proj", "down_proj")
"""Linears whose input gets SubLN (Qwen/Llama/Gemma names of the attention output and MLP down projection)."""
ACTIVATION_EPS = 1e-5  # torchao's BitNet forward uses this floor for the per-token scale
PACKED_FILE = "ternary.safetensors"
LATENT_FILE = "latent.safetensors"
SETTINGS_FILE = "ternary.json"


# ------------------------------------------------------------------------------------------------ quantizers


def ternary_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (codes [out, in] int8 in {−1, 0, 1}, Δ scalar fp32 = mean|weight|)."""
    # torchao imported on first use: importing it costs seconds and prints library warnings on CPU builds.
    from torchao.prototype.quantized_training.bitnet import get_bitnet_scale, quantize_bitnet_weight

    scale = get_bitnet_scale(weight)
    return quantize_bitnet_weight(weight, scale), scale


def ternary_weight(weight: Tensor) -> Tensor:
    """weight [out, in] -> Δ · codes in weight's dtype: the values the forward uses (no gradient path)."""
    codes, scale = ternary_codes(weight)
    return (codes.float() * scale).to(weight.dtype)


def int8_per_token(x: Tensor) -> Tensor:
    """x [..., H] -> x fake-quantized to int8 per row (absmax / 127), dequantized, in x's dtype."""
    from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

    rows = x.reshape(-1, x.shape[-1])
    codes, row_scale = quantize_int8_rowwise(rows.detach(), eps=ACTIVATION_EPS)
    return (codes.float() * row_scale.float()[:, None]).to(x.dtype).reshape(x.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantized`` exactly (``value + (q − value).detach()`` is off by float rounding);
    backward: the gradient goes to ``value`` unchanged."""

    @staticmethod
    def forward(ctx, value: Tensor, quantized: Tensor) -> Tensor:
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _straight_through(value: Tensor, quantized: Tensor) -> Tensor:
    return _StraightThrough.apply(value, quantized.detach())


# -------------------------------------------------------------------------------------------------- layers


class BitLinear(nn.Linear):
    """nn.Linear with a ternary weight and int8 activations in forward, STE in backward; optional SubLN."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, subln_eps: float | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.subln = nn.RMSNorm(in_features, eps=subln_eps, device=device, dtype=dtype) \
            if subln_eps is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, subln_eps: float | None = None) -> "BitLinear":
        """A BitLinear sharing ``linear``'s weight (and bias) parameters."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, subln_eps=subln_eps,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.subln is not None:
            x = self.subln(x)
        x_q = _straight_through(x, int8_per_token(x))
        w_q = _straight_through(self.weight, ternary_weight(self.weight))
        return F.linear(x_q, w_q, self.bias)


class PackedBitLinear(nn.Module):
    """Inference layer of an exported ternary student: 2-bit codes + Δ, the same forward as BitLinear."""

    def __init__(self, packed: Tensor, scale: Tensor, in_features: int, bias: Tensor | None,
                 subln: nn.Module | None):
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.subln = subln

    def weight_values(self) -> Tensor:
        """[out, in] Δ · codes in the scale's dtype (fp32)."""
        return unpack_codes(self.packed, self.in_features).float() * self.scale

    def forward(self, x: Tensor) -> Tensor:
        if self.subln is not None:
            x = self.subln(x)
        return F.linear(int8_per_token(x), self.weight_values().to(x.dtype), self.bias)


# --------------------------------------------------------------------------------------------- conversion


def convert_to_ternary(lm: nn.Module, *, subln: bool) -> nn.Module:
    """Swap every nn.Linear inside the decoder blocks for a BitLinear (in place; weights shared). Returns lm."""
    eps = float(getattr(lm.config.get_text_config(), "rms_norm_eps", 1e-6))
    for block in decoder_layers(lm):
        targets = [(name, module) for name, module in block.named_modules()
                   if type(module) is nn.Linear]  # exact type: never wrap a BitLinear twice
        for name, linear in targets:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            use_subln = subln and leaf in SUBLN_PROJECTIONS
            setattr(parent, leaf, BitLinear.from_linear(linear, eps if use_subln else None))
    return lm


def bit_linears(model: nn.Module) -> dict[str, BitLinear]:
    """Qualified name → BitLinear of every ternary layer in ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BitLinear)}


# ------------------------------------------------------------------------------------------------- packing


def pack_codes(codes: Tensor) -> Tensor:
    """codes [out, in] int8 in {−1, 0, 1} -> [out, ceil(in / 4)] uint8, 4 codes per byte (t + 1, low bits first)."""
    out_features, in_features = codes.shape
    padded = F.pad((codes + 1).to(torch.uint8), (0, (-in_features) % 4))  # pad with code 0 (t = −1), cut on unpack
    quads = padded.reshape(out_features, -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_codes(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: [out, ceil(in / 4)] uint8 -> [out, in] int8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & 0b11  # [out, in/4, 4]
    return codes.reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1


# ----------------------------------------------------------------------------------------------- save / load


def save_latent(model: nn.Module, tokenizer, directory: Path, *, subln: bool) -> None:
    """The trained ternary student's latent weights (fp32 as trained), its HF config and tokenizer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    _untie(state, model)
    save_file(state, str(directory / LATENT_FILE))
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / SETTINGS_FILE).write_text(json.dumps({"format": "latent", "subln": subln}, indent=2) + "\n")


def _untie(state: dict[str, Tensor], model: nn.Module) -> None:
    """safetensors refuses shared storage: drop the tied lm_head (re-tied by the model on load)."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)


def _skeleton(directory: Path, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = json.loads((directory / SETTINGS_FILE).read_text())
    config = AutoConfig.from_pretrained(directory)
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return convert_to_ternary(lm, subln=bool(settings["subln"])), settings


def load_latent(directory: Path) -> nn.Module:
    """A trainable ternary student (BitLinear layers, fp32) from :func:`save_latent`'s directory."""
    from safetensors.torch import load_file

    lm, _ = _skeleton(Path(directory), torch.float32)
    lm.load_state_dict(load_file(str(Path(directory) / LATENT_FILE)), strict=False)
    lm.tie_weights()
    return lm.eval()


def save_packed(model: nn.Module, tokenizer, directory: Path, *, subln: bool, dtype: torch.dtype) -> None:
    """2-bit codes + fp32 Δ for every BitLinear; every other tensor (embeddings, norms, SubLN gains) in ``dtype``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    layers = bit_linears(model)
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "weight":
            codes, scale = ternary_codes(tensor.detach().float())
            state[f"{owner}.packed"] = pack_codes(codes).contiguous().cpu()
            state[f"{owner}.scale"] = scale.reshape(()).contiguous().cpu()
        else:
            state[name] = tensor.detach().to(dtype).contiguous().cpu()
    _untie(state, model)
    save_file(state, str(directory / PACKED_FILE))
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    in_features = {name: layer.in_features for name, layer in layers.items()}
    (directory / SETTINGS_FILE).write_text(json.dumps({"format": "packed_2bit", "subln": subln,
                                                       "dtype": str(dtype).removeprefix("torch."),
                                                       "in_features": in_features}, indent=2) + "\n")


def load_packed(directory: str | Path) -> nn.Module:
    """The exported ternary student for inference: PackedBitLinear layers (2-bit codes in memory), eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    dtype = getattr(torch, settings["dtype"])
    lm, _ = _skeleton(directory, dtype)
    state = load_file(str(directory / PACKED_FILE))
    for name, layer in bit_linears(lm).items():
        parent_name, _, leaf = name.rpartition(".")
        bias = state.pop(f"{name}.bias", None)
        subln = layer.subln
        if subln is not None:
            subln.weight.data = state.pop(f"{name}.subln.weight")
        packed = PackedBitLinear(state.pop(f"{name}.packed"), state.pop(f"{name}.scale"),
                                 settings["in_features"][name], bias, subln)
        setattr(lm.get_submodule(parent_name), leaf, packed)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{directory / PACKED_FILE}: unexpected tensors {unexpected[:3]}")
    lm.tie_weights()
    return lm.eval()
