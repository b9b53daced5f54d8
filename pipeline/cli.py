"""The ``pipeline`` command line: a click group whose commands run the stages.

User errors (config, data, cache) print one line ``error: ...`` on stderr and exit with code 2, without a
traceback; see :mod:`kd.errors`. Commands import their recipe when they run, so ``--help`` and ``show-config``
start without loading torch or vLLM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cache_schema import CacheError
from kd.errors import UserError
from kd.teacher.factory import DEFAULT_VERIFY_BACKEND, TEACHER_BACKENDS
from pipeline.failures import named_os_errors
from pipeline.run_log import library_output_to_log, run_log_path

CONFIG_HELP = "Config file path, or a bare name from configs/ (e.g. tiny.yaml)."


def verbose_option(command):
    """``--verbose``: libraries' warnings and progress bars on the terminal too (default: only in the run log)."""
    return click.option("--verbose", is_flag=True,
                        help="Show libraries' warnings and progress bars here too (default: they go to "
                             "<run dir>/logs/<command>.log).")(command)


def _library_log(cfg, command: str, verbose: bool):
    """The command's run log (``<run dir>/logs/<command>.log``) as the block's home for library noise."""
    return library_output_to_log(run_log_path(cfg, command), command, verbose, echo=click.echo)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Offline knowledge distillation from cached teacher top-K logprobs."""


@cli.command("show-config")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.argument("overrides", nargs=-1)
def show_config(config_name: str, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved config (defaults, base chain, file, overrides) as YAML."""
    from pipeline.config_loader import config_to_yaml, load_config

    click.echo(config_to_yaml(load_config(config_name, overrides)), nl=False)


@cli.command("inspect-cache")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--validate/--no-validate", default=False, help="Also run deep validation of every sample.")
def inspect_cache(path: str, as_json: bool, validate: bool) -> None:
    """Summarise a teacher cache: samples, tokens, K, bytes per token, fingerprints, kept mass."""
    from pipeline.inspect import cache_summary, format_summary

    summary = cache_summary(path, validate=validate)
    click.echo(json.dumps(summary, indent=2, sort_keys=True) if as_json else format_summary(summary))


@cli.command("verify-cache")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="How many cached samples to re-score (a seeded random draw).")
@click.option("--backend", type=click.Choice(TEACHER_BACKENDS), default=None,
              help=f"Engine to re-score with (default: {DEFAULT_VERIFY_BACKEND}, whatever wrote the cache).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample draw.")
@click.option("--teacher", "model", default=None, help="Re-score with this model instead of the recorded one.")
@click.option("--server-url", "server_urls", multiple=True,
              help="--backend server: a server URL (repeatable; default: the recorded teacher.server.urls).")
@click.option("--json", "as_json", is_flag=True, help="Also print the report as JSON.")
@verbose_option
@click.pass_context
def verify_cache_command(ctx: click.Context, path: str, samples: int, backend: str | None, seed: int,
                         model: str | None, server_urls: tuple[str, ...], as_json: bool, verbose: bool) -> None:
    """Re-score a random sample of a cache with its teacher; exit 0 when it agrees within tolerance, else 1."""
    from stages.verify_cache import verify_cache

    log = Path(path).resolve().parent / "logs" / "verify-cache.log"
    with library_output_to_log(log, "verify-cache", verbose, echo=click.echo):
        report = verify_cache(path, samples=samples, seed=seed, backend=backend, model=model,
                              server_urls=server_urls, echo=click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    ctx.exit(0 if report["holds"] else 1)


@cli.command("cache-teacher")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="dask LocalCluster worker processes (one engine and, where GPUs exist, one GPU each); "
                   "0 scores in this process without dask.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler to run the shards on.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other fingerprints.")
@click.option("--repair", is_flag=True, help="Read every part back and re-score only the damaged ones.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@verbose_option
@click.argument("overrides", nargs=-1)
def cache_teacher_command(config_name: str, workers: int, scheduler: str | None, overwrite: bool, repair: bool,
                          progress: bool, verbose: bool, overrides: tuple[str, ...]) -> None:
    """Stage one: score the samples with the teacher and write the top-K cache (resumable)."""
    from pipeline.config_loader import load_config
    from stages.cache_teacher import cache_teacher

    cfg = load_config(config_name, overrides)
    with named_os_errors(f"cache.path={cfg.cache.path}"), _library_log(cfg, "cache-teacher", verbose):
        cache_teacher(cfg, workers=workers, scheduler=scheduler, overwrite=overwrite, repair=repair,
                      progress=progress, echo=click.echo)


@cli.command("train-student")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.option("--resume", is_flag=True, help="Continue exactly from the latest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in an output_dir that holds another run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@verbose_option
@click.argument("overrides", nargs=-1)
def train_student_command(config_name: str, resume: bool, overwrite: bool, progress: bool, verbose: bool,
                          overrides: tuple[str, ...]) -> None:
    """Stage two: train the student from the cache (the teacher is never loaded)."""
    from pipeline.config_loader import load_config
    from stages.train_student import train_student

    cfg = load_config(config_name, overrides)
    with named_os_errors(f"train.output_dir={cfg.train.output_dir}"), \
            _library_log(cfg, "train-student", verbose):
        train_student(cfg, resume=resume, overwrite=overwrite, progress=progress, echo=click.echo)


@cli.command("run-all")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Stage one: dask worker processes (0: in this process).")
@click.option("--overwrite", is_flag=True, help="Replace a mismatched cache / another run's output_dir.")
@click.option("--resume", is_flag=True, help="Stage two: continue from the latest checkpoint.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@click.option("--baseline", type=click.Choice(["none", "sft"]), default=None,
              help="sft: also train a CE-only student of the same steps and report it (sets eval.baseline).")
@verbose_option
@click.argument("overrides", nargs=-1)
def run_all_command(config_name: str, workers: int, overwrite: bool, resume: bool, progress: bool,
                    baseline: str | None, verbose: bool, overrides: tuple[str, ...]) -> None:
    """Both stages (stage one skipped when a matching complete cache exists), then evaluation."""
    from pipeline.config_loader import load_config
    from pipeline.run_all import run_all

    cfg = load_config(config_name, _with_baseline(overrides, baseline))
    with named_os_errors(f"cache.path={cfg.cache.path} or train.output_dir={cfg.train.output_dir}"), \
            _library_log(cfg, "run-all", verbose):
        run_all(cfg, workers=workers, overwrite=overwrite, resume=resume, progress=progress, echo=click.echo)


STUDY_ARMS_TEXT = "kd_fewshot,sft,online_gkd,kd_zeroshot,kd_shuffled"


@cli.command("study")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Training seeds per arm (the config's seed, +1, ...).")
@click.option("--arms", default=STUDY_ARMS_TEXT, show_default=True, help="Comma-separated arms to run.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Study directory (default: <parent of train.output_dir>/study).")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Stage one: dask worker processes (0: in this process).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@verbose_option
@click.argument("overrides", nargs=-1)
def study_command(config_name: str, seeds: int, arms: str, out_dir: str | None, workers: int, progress: bool,
                  verbose: bool, overrides: tuple[str, ...]) -> None:
    """Cached KD vs SFT vs online KD vs the no-shot and shuffled-shot teachers, over seeds (study.md)."""
    from pipeline.config_loader import load_config
    from pipeline.study import parse_arms, study

    cfg = load_config(config_name, overrides)
    out = Path(out_dir) if out_dir else Path(cfg.train.output_dir).parent / "study"
    with named_os_errors(f"the study directory {out}"), \
            library_output_to_log(out / "logs" / "study.log", "study", verbose, echo=click.echo):
        study(cfg, seeds=seeds, out=out, arms=parse_arms(arms), workers=workers, progress=progress,
              echo=click.echo)


def _with_baseline(overrides: tuple[str, ...], baseline: str | None) -> list[str]:
    return [*overrides, f"eval.baseline={baseline}"] if baseline else list(overrides)


def _parse_steps(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        steps = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of steps (e.g. 100,200)") from None
    if not steps or min(steps) < 1:
        raise click.BadParameter(f"{value!r}: steps must be positive integers (e.g. 100,200)")
    return steps


@cli.command("eval")
@click.option("--config", "config_name", required=True, help=CONFIG_HELP)
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False),
              help="Run directory to evaluate (default: train.output_dir of the config).")
@click.option("--steps", callback=_parse_steps, default=None,
              help="Checkpoint steps to evaluate, e.g. 200,400 (default: eval.steps, else every kept checkpoint).")
@click.option("--baseline", type=click.Choice(["none", "sft"]), default=None,
              help="sft: include the CE-only baseline run (<output_dir>-sft) in the report.")
@verbose_option
@click.argument("overrides", nargs=-1)
def eval_command(config_name: str, run_dir: str | None, steps: list[int] | None, baseline: str | None,
                 verbose: bool, overrides: tuple[str, ...]) -> None:
    """Evaluate the teacher (with and without shots), the untrained student and trained checkpoints."""
    from pipeline.config_loader import load_config
    from stages.evaluate import evaluate

    cfg = load_config(config_name, _with_baseline(overrides, baseline))
    with named_os_errors(f"the run directory {run_dir or cfg.train.output_dir}"), \
            _library_log(cfg, "eval", verbose):
        evaluate(cfg, run_dir=run_dir, steps=steps, echo=click.echo)


@cli.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="A finished stage-two run directory (train.output_dir) of a quantized student.mode.")
def export_command(run_dir: str) -> None:
    """Convert a quantized student (int4 via torchao, ternary as packed 2-bit) and report sizes on disk."""
    from stages.export import export_run

    export_run(run_dir, echo=click.echo)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the group, turning user errors into one line and exit code 2."""
    try:
        # Commands that decide their exit code (verify-cache) return it through click's Exit.
        code = cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (UserError, CacheError) as exc:
        click.echo(f"error: {_first_line(exc)}", err=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
