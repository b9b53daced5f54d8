"""Config rules of the quantized modes and the attention-relation term."""

from __future__ import annotations

import pytest

from kd.errors import ConfigError
from pipeline.config_loader import load_config


@pytest.mark.parametrize("overrides, key", [
    (["train.attention_weight=1"], "train.attention_weight"),  # tiny.yaml caches no relations
    (["student.quant.group_size=0"], "student.quant.group_size"),
    (["student.quant.activations=int4"], "student.quant.activations"),
    (["student.mode=int2"], "student.mode"),
    (["train.attention_weight=-1", "teacher.attention.enabled=true", "teacher.backend=hf"],
     "train.attention_weight"),
])
def test_quantized_settings_are_validated(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


@pytest.mark.parametrize("mode", ["lora", "full", "ternary"])
def test_embedding_quantization_is_refused_where_the_mode_would_ignore_it(mode):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [f"student.mode={mode}", "student.quant.embedding=true"])
    message = str(error.value)
    assert "\n" not in message and f"student.quant.embedding: student.mode={mode} does not quantize" in message
    assert "set student.quant.embedding=false" in message
    for mode in ("qat_int4", "qat_int4_lora"):
        assert load_config("tiny", [f"student.mode={mode}", "student.quant.embedding=true"]).student.quant.embedding


def test_bitdistill_configs_follow_the_paper_numbers():
    cfg = load_config("bitdistill.yaml")
    assert (cfg.student.mode, cfg.train.temperature, cfg.train.kd_weight, cfg.train.ce_weight) == \
        ("ternary", 5.0, 10.0, 1.0)
    assert cfg.teacher.backend == "hf" and cfg.teacher.attention.enabled and cfg.train.attention_weight > 0
    tiny = load_config("tiny_bitdistill.yaml")
    assert tiny.student.model.endswith("assets/tiny/student") and tiny.teacher.attention.num_heads == 4
    assert (tiny.train.temperature, tiny.train.kd_weight) == (5.0, 10.0)  # inherited
    int4 = load_config("int4_qat.yaml")
    assert (int4.student.mode, int4.train.kd_kind, int4.student.quant.group_size) == ("qat_int4_lora", "forward_kl", 32)
    assert int4.student.quant.embedding is False and int4.student.quant.lm_head is False
