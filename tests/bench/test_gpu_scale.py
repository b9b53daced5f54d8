"""bench.gpu_scale refuses plainly without a GPU; non-tiny configs' results go to their own folder."""

import pytest
import torch
from click.testing import CliRunner

from bench.gpu_scale import main as gpu_scale_main
from bench.run import result_dir


def test_results_of_other_configs_do_not_replace_the_tiny_ones():
    assert result_dir("tiny.yaml", "bench/results") == "bench/results"
    assert result_dir("tiny", "runs/bench") == "runs/bench"
    assert result_dir("scale.yaml", "bench/results") == "bench/results/scale"
    assert result_dir("configs/scale_gpu.yaml", "runs/bench") == "runs/bench/scale_gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_gpu_scale_without_a_gpu_is_one_line_exit_2():
    outcome = CliRunner().invoke(gpu_scale_main, [])
    assert outcome.exit_code == 2 and "no CUDA GPU visible" in outcome.output
