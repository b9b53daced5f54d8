"""``python -m bench.run`` (``make bench``): run the benchmarks, write bench/results/<name>.json, print a table.

    python -m bench.run                          # everything on configs/tiny.yaml (~15 min on 2 idle cores)
    python -m bench.run --only stage_two --only online_gkd
    python -m bench.run --config my.yaml --backends hf train.batch_size=32

vLLM engines start worker processes: this module is the ``__main__`` guard they need.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import click

from bench.workspace import BenchSettings

BENCHMARKS = ("cache_size", "stage_one", "stage_two", "online_gkd", "loader", "scaling", "target_modes")


def _runner(name: str) -> Callable:
    import importlib

    module = importlib.import_module(f"bench.{name}")
    return getattr(module, f"run_{name}")


def run_benchmarks(settings: BenchSettings, only: tuple[str, ...] = (), echo: Callable = print) -> dict[str, str]:
    """Run the named benchmarks (all by default) in a fixed order; returns {name: result file}."""
    from bench.workspace import apply_threads

    apply_threads(settings)
    written = {}
    for name in BENCHMARKS:
        if only and name not in only:
            continue
        echo(f"bench: {name} ...")
        started = time.perf_counter()
        result = _runner(name)(settings)
        if settings.note:
            result.notes.append(settings.note)
        path = result.write(settings.out_dir)
        written[name] = str(path)
        echo(f"bench: {name} done in {time.perf_counter() - started:.0f} s -> {path}")
    return written


def result_dir(config_name: str, root: str) -> str:
    """``root`` for the tiny config, ``root/<config stem>`` for any other: one config's results never replace
    another's (the README shows the tiny and scale tables side by side)."""
    stem = Path(config_name).name.removesuffix(".yaml")
    return root if stem == "tiny" else f"{root}/{stem}"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_name", default="tiny.yaml", show_default=True,
              help="Pipeline config the benchmarks start from (path or name in configs/).")
@click.option("--only", multiple=True, type=click.Choice(BENCHMARKS), help="Run only these (repeatable).")
@click.option("--backends", default="hf,vllm", show_default=True, help="Stage-one backends, comma-separated.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed repeats per condition, after one warm-up.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads per process (default: the library's choice, all cores).")
@click.option("--cache-samples", type=click.IntRange(min=8), default=BenchSettings.cache_samples, show_default=True,
              help="Samples in the cache the training, loader and scaling benchmarks read.")
@click.option("--note", default=None, help="Text added to every result file's notes (e.g. machine was shared).")
@click.option("--out", "out_dir", default=None,
              help="Where <name>.json go (default bench/results for tiny.yaml, bench/results/<config> otherwise).")
@click.option("--work-dir", default=None, help="Scratch caches and runs (default runs/bench[/<config>]).")
@click.argument("overrides", nargs=-1)
def main(config_name: str, only: tuple[str, ...], backends: str, repeats: int, threads: int | None,
         cache_samples: int, note: str | None, out_dir: str, work_dir: str, overrides: tuple[str, ...]) -> None:
    """Benchmarks: stage-one throughput, stage-two cost, online GKD, cache size, loader headroom."""
    from bench.report import markdown_table

    out_dir, work_dir = out_dir or result_dir(config_name, "bench/results"), work_dir or result_dir(config_name, "runs/bench")
    settings = BenchSettings(config_name=config_name, overrides=overrides, backends=_csv(backends),
                             repeats=repeats, threads=threads, note=note, out_dir=out_dir, work_dir=work_dir,
                             cache_samples=cache_samples)
    started = time.perf_counter()
    written = run_benchmarks(settings, only, echo=click.echo)
    click.echo(markdown_table({name: json.loads(open(path).read()) for name, path in written.items()}))
    click.echo(f"bench: all done in {time.perf_counter() - started:.0f} s; results in {out_dir}/")


def entry(argv: list[str] | None = None) -> int:
    """Run :func:`main`; user errors (config, data, cache) become one ``error:`` line and exit code 2."""
    from cache_schema import CacheError
    from kd.errors import UserError

    try:
        main.main(args=argv, prog_name="bench", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (UserError, CacheError) as exc:
        click.echo(f"error: {str(exc).strip().splitlines()[0]}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(entry())
