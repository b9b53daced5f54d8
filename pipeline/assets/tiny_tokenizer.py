"""Train the tiny byte-level BPE tokenizer for the synthetic task and wrap it for transformers/vLLM.

Byte-level BPE (GPT-2/Qwen style) over the task text, with every digit its own pre-token so that multi-digit
numbers are spelled digit by digit (arithmetic is then learnable by a tiny model). Special tokens follow Qwen:
"<|endoftext|>" (eos and pad), "<|im_start|>", "<|im_end|>", and a ChatML chat template. The template accepts
and ignores ``enable_thinking`` (there is no think block).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# A trainer target that is not a multiple of 64, so the models' padded embedding (rounded up) is exercised.
DEFAULT_VOCAB_SIZE = 600

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and return a transformers fast tokenizer with the ChatML template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def task_texts(rows: list[dict[str, str]]) -> list[str]:
    """The strings the tokenizer is trained on: every question and every worked answer."""
    return [text for row in rows for text in (row["question"], row["answer"])]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
