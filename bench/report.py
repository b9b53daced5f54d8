"""The summary table of a benchmark run (Markdown: printed by ``bench.run`` and pasted into the README)."""

from __future__ import annotations

from typing import Any


def _pm(stats: dict[str, Any], scale: float = 1.0, digits: int = 0) -> str:
    """'median ±spread%' of a spread() record."""
    if not stats or stats.get("median") is None:
        return "n/a"
    spread = stats.get("rel_spread")
    text = f"{stats['median'] * scale:,.{digits}f}"
    return text + (f" ±{100 * spread:.0f}%" if spread is not None else "")


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def stage_one_table(result: dict[str, Any]) -> list[str]:
    lines = ["| stage one: backend, shots | mean prompt tokens | cache-teacher tok/s | plain prompt_logprobs tok/s "
             "| prefill-only tok/s | cache-teacher / plain | cache-teacher / prefill |",
             "|---|---|---|---|---|---|---|"]
    for backend, data in result["results"].items():
        if "rows" in data:  # vllm: the scorings table below
            continue
        for shots, row in data["shots"].items():
            r = row["ratios"]
            lines.append(f"| {backend}, {shots}-shot | {row['mean_prompt_tokens']:.0f} | "
                         f"{_pm(row['cache_teacher']['tokens_per_s'])} | "
                         f"{_pm(row['prompt_logprobs']['tokens_per_s'])} | "
                         f"{_pm(row['prefill']['tokens_per_s'])} | {_x(r['cache_teacher_over_prompt_logprobs'])} | "
                         f"{_x(r['cache_teacher_over_prefill'])} |")
    if "rows" in result["results"].get("vllm", {}):
        lines += [""] + stage_one_scorings_table(result["results"]["vllm"])
    return lines


def stage_one_scorings_table(data: dict[str, Any]) -> list[str]:
    """vLLM span path vs prompt_logprobs vs prefill-only (and the hf span path): tok/s (peak extra MiB)."""
    def cell(figures: dict[str, Any]) -> str:
        return f"{_pm(figures['tokens_per_s'])} ({figures['peak_extra_mb']:,.0f})"

    header = ("| stage one (vllm): shots, sets, K | mean prompt tokens | span tok/s (MiB) | prompt_logprobs tok/s "
              "(MiB) | prefill-only tok/s (MiB) | hf span tok/s (MiB) | span / prompt_logprobs | span / prefill |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, row in data["rows"].items():
        r = row["ratios"]
        lines.append(f"| {name} | {row['mean_prompt_tokens']:.0f} | {cell(row['span'])} | "
                     f"{cell(row['prompt_logprobs'])} | {cell(row['prefill'])} | {cell(row['hf_span'])} | "
                     f"{_x(r['span_over_prompt_logprobs'])} | {_x(r['span_over_prefill'])} |")
    long = data["long_prompt"]
    lines.append(f"| long prompt ({long['context_tokens']} tokens, 32 scored), seconds (MiB) | | "
                 + " | ".join(f"{long[c]['seconds']:.2f} s ({long[c]['peak_extra_mb']:,.0f})"
                              for c in ("span", "prompt_logprobs")) + " | | "
                 + f"{long['hf_span']['seconds']:.2f} s ({long['hf_span']['peak_extra_mb']:,.0f}) | | |")
    starts = ", ".join(f"{k} {v:.0f} s" for k, v in data["engine_start_s"].items())
    lines.append(f"\nEngine starts (not in any throughput): {starts}.")
    return lines


def training_table(stage_two: dict[str, Any] | None, online: dict[str, Any] | None) -> list[str]:
    lines = ["| stage two: condition | step time ms | peak RSS MiB | peak RSS over imports MiB | step time vs "
             "cached KD | peak RSS vs cached KD |", "|---|---|---|---|---|---|"]

    def row(label, cond, base_step=None, base_rss=None):
        step, rss = cond["step_time_s"]["median"], cond["peak_rss_mb"]["median"]
        lines.append(f"| {label} | {_pm(cond['step_time_s'], 1000, 1)} | {_pm(cond['peak_rss_mb'])} | "
                     f"{_pm(cond['peak_rss_over_imports_mb'])} | "
                     f"{_x(step / base_step) if base_step else '1.00×'} | "
                     f"{_x(rss / base_rss) if base_rss else '1.00×'} |")

    if stage_two:
        r = stage_two["results"]
        row("KD from the cache", r["kd"])
        row("CE-only fine-tuning", r["ce"], r["kd"]["step_time_s"]["median"], r["kd"]["peak_rss_mb"]["median"])
    if online:
        r = online["results"]
        kd = r["cached_kd"]
        if not stage_two:
            row("KD from the cache", kd)
        row(f"online GKD (TRL, teacher {r['teacher_over_student_params']:.1f}× student)", r["online_gkd"],
            kd["step_time_s"]["median"], kd["peak_rss_mb"]["median"])
    return lines


def cache_size_table(result: dict[str, Any]) -> list[str]:
    lines = ["| cache: K | encoding | bytes / distilled token | top-K bytes / kept entry | kept mass median | p10 "
             "| p1 | min |", "|---|---|---|---|---|---|---|---|"]
    for encoding in ("plain", "compact"):
        for k, r in result["results"].get(encoding, {}).items():
            m = r["kept_mass"]
            lines.append(f"| {k} | {encoding} | {r['bytes_per_distilled_token']:.1f} | {r['bytes_per_kept_entry']:.2f} "
                         f"| {m['median']:.4f} | {m['p10']:.4f} | {m['p1']:.4f} | {m['min']:.4f} |")
    return lines


def loader_table(result: dict[str, Any]) -> list[str]:
    r = result["results"]
    return ["| loader | samples/s | tokens/s |", "|---|---|---|",
            f"| streaming loader alone | {_pm(r['loader']['samples_per_s'])} | {_pm(r['loader']['tokens_per_s'])} |",
            f"| consumed by KD training | {_pm(r['training']['samples_per_s'])} | "
            f"{_pm(r['training']['tokens_per_s'])} |",
            f"| headroom (alone / consumed) | {_x(r['headroom']['samples'])} | {_x(r['headroom']['tokens'])} |",
            *([f"| loader alone, compact top-K encoding | {_pm(r['loader_compact']['samples_per_s'])} | "
               f"{_pm(r['loader_compact']['tokens_per_s'])} |",
               f"| compact / plain loader | {_x(r['compact_over_plain'])} | |"] if "loader_compact" in r else [])]


SCALING_COLUMNS = {"stage_one_vs_samples": ("num_samples", "seconds", "teacher_tokens_per_s"),
                   "stage_one_vs_context": ("num_fewshot", "teacher_tokens_per_sample", "seconds",
                                            "teacher_tokens_per_s"),
                   "stage_two_vs_top_k": ("top_k", "condition", "step_time_s", "peak_rss_mb"),
                   "stage_two_vs_sequence_length": ("sequence_length", "condition", "step_time_s", "peak_rss_mb"),
                   "bytes_vs_top_k": ("top_k", "bytes_per_token", "bytes_per_entry")}


def scaling_tables(result: dict[str, Any]) -> list[str]:
    """One small table per scaling curve (the PNGs beside the JSON plot the same rows)."""
    lines: list[str] = []
    for name, columns in SCALING_COLUMNS.items():
        rows = result["results"].get(name) or []
        if not rows:
            continue
        if lines:
            lines.append("")
        lines += [f"| {name.replace('_', ' ')}: " + " | ".join(columns[:1]) + " | " + " | ".join(columns[1:]) + " |",
                  "|" + "---|" * len(columns)]
        for row in rows:
            cells = ["any" if row.get(c) is None and c == "top_k" else
                     f"{row[c]:,.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables for whichever results are present (medians ± relative spread over repeats)."""
    blocks = []
    if "stage_one" in results:
        blocks.append(stage_one_table(results["stage_one"]))
    if "stage_two" in results or "online_gkd" in results:
        blocks.append(training_table(results.get("stage_two"), results.get("online_gkd")))
    if "cache_size" in results:
        blocks.append(cache_size_table(results["cache_size"]))
    if "loader" in results:
        blocks.append(loader_table(results["loader"]))
    if "scaling" in results:
        blocks.append(scaling_tables(results["scaling"]))
    return "\n\n".join("\n".join(block) for block in blocks)
