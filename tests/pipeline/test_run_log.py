"""run_log: library noise (C writes, child processes, warnings, library loggers) goes to the run log; the
project's own lines stay on the terminal; --verbose keeps everything on the terminal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.cli import main
from pipeline.config_loader import load_config
from pipeline.run_log import library_output_to_log, run_log_path

NOISY_BLOCK = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from pipeline.run_log import library_output_to_log
    with library_output_to_log(Path(sys.argv[1]), "demo", verbose=sys.argv[2] == "1"):
        print("project line")
        print("project bar", file=sys.stderr)
        os.write(1, b"c-level stdout\\n")
        os.write(2, b"c-level stderr\\n")
        warnings.warn("a library FutureWarning", FutureWarning)
        logging.getLogger("vllm.worker").warning("a library logger warning")
        subprocess.run([sys.executable, "-c", "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"],
                       check=True)
    print("after the block")
""")
NOISE = ("c-level stdout", "c-level stderr", "a library FutureWarning", "a library logger warning",
         "child stdout", "child stderr")


def _run_block(tmp_path: Path, verbose: bool) -> tuple[str, str, str]:
    log = tmp_path / "logs" / "demo.log"
    done = subprocess.run([sys.executable, "-c", NOISY_BLOCK, str(log), "1" if verbose else "0"],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout, done.stderr, log.read_text() if log.exists() else ""


def test_noise_goes_to_the_log_and_project_lines_stay(tmp_path):
    out, err, log = _run_block(tmp_path, verbose=False)
    assert out.splitlines() == ["project line",
                                f"(library messages: {tmp_path / 'logs' / 'demo.log'}; --verbose shows them here)",
                                "after the block"]
    assert err.splitlines() == ["project bar"]
    for line in NOISE:
        assert line in log, line
    assert "pipeline demo" in log.splitlines()[1]  # the run's header


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    out, err, log = _run_block(tmp_path, verbose=True)
    terminal = out + err
    for line in NOISE:
        assert line in terminal, line
    assert log == ""


def test_a_second_run_appends(tmp_path):
    _run_block(tmp_path, verbose=False)
    *_, log = _run_block(tmp_path, verbose=False)
    assert log.count("pipeline demo") == 2 and log.count("child stderr") == 2


def test_without_descriptors_only_records_are_redirected(tmp_path, capsys):
    """click's test runner and pytest's capsys have no file descriptors: the block still runs, records go to
    the log, and the streams are left alone."""
    import logging
    import warnings

    log = tmp_path / "x.log"
    with library_output_to_log(log, "x"):
        print("project line")
        warnings.warn("quiet please", UserWarning)
        logging.getLogger("distributed.worker").warning("worker noise")
    out = capsys.readouterr().out
    assert out.startswith("project line\n") and "library messages" in out
    text = log.read_text()
    assert "quiet please" in text and "worker noise" in text


def test_run_log_path_is_beside_the_output_dir(tmp_path):
    cfg = load_config("tiny", [f"train.output_dir={tmp_path}/run/student"])
    assert run_log_path(cfg, "run-all") == (tmp_path / "run" / "logs" / "run-all.log").resolve()


def test_the_cli_names_the_log_and_accepts_verbose(tmp_path, capsys):
    overrides = ["teacher.backend=hf", "data.max_samples=4", "cache.shard_size=4", "teacher.top_k=4",
                 f"cache.path={tmp_path}/cache", f"train.output_dir={tmp_path}/student"]
    assert main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", *overrides]) == 0
    assert (tmp_path / "logs" / "cache-teacher.log").is_file()
    assert main(["cache-teacher", "--config", "tiny", "--workers", "0", "--no-progress", "--verbose",
                 *overrides]) == 0
    assert "nothing to do" in capsys.readouterr().out
