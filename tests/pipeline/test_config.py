"""Configs: every shipped file loads and validates; each kind of user error is one line naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kd.config import Config
from kd.errors import ConfigError
from kd.teacher.factory import requested_temperatures
from pipeline.cli import main as cli_main
from pipeline.config_loader import REPO_CONFIGS_DIR, load_config

SHIPPED = sorted(p.name for p in REPO_CONFIGS_DIR.glob("*.yaml"))
STABLE_KEYS = ["teacher.model", "teacher.backend", "teacher.top_k", "student.model", "data.train",
               "data.num_fewshot", "cache.path", "train.output_dir", "train.max_steps", "seed"]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    for key in STABLE_KEYS:
        if key == "data.train" and (cfg.data.mixture or cfg.data.mixture_file):
            continue  # a mixture config names its sources in data.mixture / data.mixture_file instead
        assert _get(cfg, key) is not None, key
    text = (REPO_CONFIGS_DIR / name).read_text()
    assert text.startswith("#"), f"{name} needs a header comment (what it runs, what it needs, the command)"
    assert "Command:" in text and "Needs:" in text and "Runs:" in text


def test_required_configs_are_shipped():
    for name in ["tiny.yaml", "qwen1b7.yaml", "qwen8b.yaml", "llama3b.yaml", "gemma270m.yaml"]:
        assert name in SHIPPED


def test_tiny_points_at_shipped_assets():
    cfg = load_config("tiny")
    assert cfg.teacher.model.endswith("pipeline/assets/tiny/teacher")
    assert Path(cfg.data.train).name == "train.jsonl"


def test_base_chain_and_overrides():
    cfg = load_config("qwen8b.yaml", ["train.max_steps=7", "teacher.top_k=32", "seed=3"])
    assert cfg.teacher.model == "Qwen/Qwen3-8B"            # from qwen8b.yaml
    assert cfg.student.model == "Qwen/Qwen3-1.7B"          # inherited from qwen1b7.yaml
    assert cfg.data.num_fewshot == 8                       # inherited
    assert cfg.cache.path == "runs/qwen8b/cache"           # overridden by the child
    assert (cfg.train.max_steps, cfg.teacher.top_k, cfg.seed) == (7, 32, 3)   # command line wins


def test_config_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny.yaml\nteacher:\n  top_k: 8\n")
    cfg = load_config(str(path))
    assert cfg.teacher.top_k == 8 and cfg.data.num_fewshot == 3


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


ERROR_CASES = {
    "unknown_name": (None, "no-such-config", [], "no such config file"),
    "yaml_syntax": ("teacher:\n  model: [unclosed\n", None, [], "YAML syntax error at line"),
    "unknown_key": ("base: tiny.yaml\nteacher:\n  topk: 3\n", None, [], "teacher.topk"),
    "wrong_type": ("base: tiny.yaml\nteacher:\n  top_k: many\n", None, [], "teacher.top_k"),
    "missing_key": ("teacher:\n  model: x\n", None, [], "student.model"),
    "bad_value": ("base: tiny.yaml\nteacher:\n  backend: tensorrt\n", None, [], "teacher.backend"),
    "bad_override_key": (None, "tiny", ["train.maxsteps=3"], "train.maxsteps"),
    "bad_override_type": (None, "tiny", ["train.max_steps=lots"], "train.max_steps"),
    "both_weights_zero": (None, "tiny", ["train.kd_weight=0", "train.ce_weight=0"], "train.kd_weight"),
    "negative_lr": (None, "tiny", ["train.lr=-1"], "train.lr"),
    "nan_lr": (None, "tiny", ["train.lr=nan"], "train.lr"),
    "relations_with_vllm": (None, "tiny", ["teacher.attention.enabled=true"], "teacher.attention.enabled"),
    # Refused here, not by the backend: each setting is checked once, in config validation.
    "teacher_backend": (None, "tiny", ["teacher.backend=jax"],
                        "teacher.backend: must be one of vllm, hf, server (got 'jax')"),
    "server_without_urls": (None, "tiny", ["teacher.backend=server"], "teacher.server.urls: teacher.backend=server "
                            "needs at least one server URL"),
    "server_url_scheme": (None, "tiny", ["teacher.backend=server", "teacher.server.urls=[gpu-a:8000]"],
                          "teacher.server.urls[0]: must start with http:// or https:// (got 'gpu-a:8000')"),
    "server_in_flight": (None, "tiny", ["teacher.backend=server", "teacher.server.urls=[http://a:1]",
                                        "teacher.server.max_in_flight=0"], "teacher.server.max_in_flight"),
    "teacher_dtype": (None, "tiny", ["teacher.dtype=float16"],
                      "teacher.dtype: must be one of auto, bfloat16, float32 (got 'float16')"),
    "relation_heads_zero": (None, "tiny", ["teacher.backend=hf", "teacher.attention.enabled=true",
                                           "teacher.attention.num_heads=0"], "teacher.attention.num_heads: must be"),
    "teacher_scoring": (None, "tiny", ["teacher.scoring=logits"],
                        "teacher.scoring: must be one of auto, span, prompt_logprobs (got 'logits')"),
    "fewshot_sets_without_shots": (None, "tiny", ["data.num_fewshot=0", "data.fewshot_sets=4"],
                                   "data.fewshot_sets: =4 shares shot sets but data.num_fewshot is 0"),
    "fewshot_sets_negative": (None, "tiny", ["data.fewshot_sets=-1"], "data.fewshot_sets: must be"),
    "eval_backend": (None, "tiny", ["eval.backend=tgi"], "eval.backend"),
    "eval_baseline": (None, "tiny", ["eval.baseline=dpo"], "eval.baseline"),
    "eval_step_zero": (None, "tiny", ["eval.steps=[0,50]"], "eval.steps"),
    "eval_fallback": (None, "tiny", ["eval.answer_fallback=first"], "eval.answer_fallback"),
    # Temperatures: the vllm backend cannot store a normalizer at τ != 1; a tail-tempered loss needs one.
    "temperature_zero": (None, "tiny", ["teacher.backend=hf", "cache.temperatures=[0]"],
                         "cache.temperatures[0]: must be a finite number > 0"),
    "temperatures_with_vllm": (None, "tiny", ["cache.temperatures=[2.0]"],
                               "cache.temperatures: teacher.backend=vllm gives top-K logprobs at τ=1 only"),
    "tail_temperature_with_vllm": (None, "tiny", ["train.temperature=2", "train.topk_handling=tail"],
                                   "train.temperature: train.topk_handling=tail at τ=2 needs the teacher's "
                                   "log-normalizer at τ=2 in the cache to temper the tail exactly; use "
                                   "teacher.backend=hf"),
    "tail_temperature_not_listed": (None, "tiny", ["teacher.backend=hf", "train.temperature=2",
                                                   "train.topk_handling=tail", "cache.temperatures=[3]"],
                                    "add 2 to cache.temperatures"),
    # Sampled targets: a known mode, S in [1, 255], a backend that sees the full row, a KD kind they serve.
    "targets_unknown": (None, "tiny", ["cache.targets=dense"], "cache.targets: must be one of topk, sampled, both"),
    "sampled_with_vllm": (None, "tiny", ["cache.targets=both"],
                          "cache.targets: teacher.backend=vllm sees only the top-K logprobs"),
    "samples_zero": (None, "tiny", ["teacher.backend=hf", "cache.targets=both", "cache.samples_per_position=0"],
                     "cache.samples_per_position: must be an integer in [1, 255]"),
    "sampled_reverse_kl": (None, "tiny", ["teacher.backend=hf", "cache.targets=sampled", "train.kd_targets=sampled",
                                          "train.kd_kind=reverse_kl"],
                           "train.kd_kind: sampled targets serve only forward_kl"),
    "kd_targets_missing": (None, "tiny", ["train.kd_targets=sampled"],
                           "train.kd_targets: train.kd_targets=sampled but cache.targets=topk"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_config_errors_name_file_and_key(tmp_path, case):
    text, name, overrides, expected = ERROR_CASES[case]
    name = _write(tmp_path, text) if text is not None else name
    with pytest.raises(ConfigError) as info:
        load_config(name, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if text is not None:
        assert "bad.yaml" in message


@pytest.mark.parametrize("case", ["unknown_key", "yaml_syntax", "unknown_name", "bad_override_type"])
def test_cli_config_errors_exit_2_one_line(tmp_path, case, capsys):
    text, name, overrides, expected = ERROR_CASES[case]
    name = _write(tmp_path, text) if text is not None else name
    code = cli_main(["show-config", "--config", name, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    """The installed `pipeline` script exits 2 with one stderr line and no traceback."""
    path = _write(tmp_path, "base: tiny.yaml\nstudent:\n  mode: sideways\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "show-config", "--config", path],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "student.mode" in proc.stderr


def test_show_config_prints_resolved_yaml(capsys):
    assert cli_main(["show-config", "--config", "tiny", "teacher.top_k=9"]) == 0
    out = capsys.readouterr().out
    assert "top_k: 9" in out and "pipeline/assets/tiny/teacher" in out


def test_stored_temperatures_default_to_the_training_temperature_where_the_backend_can():
    assert requested_temperatures(load_config("tiny", [])) == [1.0]
    assert requested_temperatures(load_config("tiny", ["teacher.backend=hf", "train.temperature=2"])) == [1.0, 2.0]
    assert requested_temperatures(load_config("tiny", ["teacher.backend=hf", "cache.temperatures=[5,0.5,1]"])) \
        == [1.0, 0.5, 5.0]
    # renormalize is exact at any τ: the vllm backend trains at τ=2 from a τ=1-only cache.
    assert requested_temperatures(load_config("tiny", ["train.temperature=2", "train.topk_handling=renormalize"])) \
        == [1.0]
    assert requested_temperatures(load_config("bitdistill", [])) == [1.0, 5.0]
