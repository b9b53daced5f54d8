"""Scale models: the compact task phase writes into the real vocabulary exactly; the shipped GPU shapes are Qwen's."""

import pytest
import torch
from transformers import Qwen3ForCausalLM

from pipeline.assets.scale.real_tokenizer import QWEN_VOCAB_SIZE, build_qwen_tokenizer
from pipeline.assets.scale.scale_models import TaskVocabularyLM, make_scale_model, task_token_ids
from pipeline.assets.scale.shaped_models import SHAPE_NAMES, shape_config
from pipeline.assets.tiny_models import STUDENT_SHAPE


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen_tokenizer()


def test_task_phase_rows_land_at_their_real_ids(tokenizer):
    sequences = [tokenizer.encode("Leah has 7 bananas. 7＋5＝12. #### 12", add_special_tokens=False)]
    task_ids = task_token_ids(sequences, tokenizer)
    assert {151643, 151645} <= set(task_ids.tolist())
    compact = TaskVocabularyLM(STUDENT_SHAPE, tokenizer, task_ids, seed=2)
    ids = torch.tensor(sequences)  # [1, T]
    labels = ids.clone()
    loss = compact(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    full = compact.expanded(make_scale_model(STUDENT_SHAPE, tokenizer, seed=2))
    assert full.config.vocab_size == QWEN_VOCAB_SIZE
    with torch.no_grad():
        full_logits = full(input_ids=ids).logits[0]  # [T, V]
        compact_logits = compact.model(input_ids=compact.row_of_id[ids]).logits[0]  # [T, S]
    # The same decoder and rows: the full model's logits at the task ids are the compact model's.
    torch.testing.assert_close(full_logits[:, task_ids], compact_logits)
    task_loss = torch.nn.functional.cross_entropy(compact_logits[:-1], compact.row_of_id[ids[0, 1:]])
    torch.testing.assert_close(loss, task_loss)
    with pytest.raises(ValueError, match="not among the task ids"):
        compact(input_ids=torch.tensor([[100]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                labels=torch.tensor([[100]]))


@pytest.mark.parametrize(("name", "billions", "tied"), [("qwen3-0.6b", 0.596, True), ("qwen3-1.7b", 1.721, True),
                                                        ("qwen3-8b", 8.191, False)])
def test_shipped_shapes_have_the_published_sizes(tokenizer, name, billions, tied):
    assert name in SHAPE_NAMES
    config = shape_config(name, tokenizer)
    assert (config.vocab_size, config.eos_token_id, config.pad_token_id) == (151_936, 151645, 151643)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions
    assert config.tie_word_embeddings is tied
