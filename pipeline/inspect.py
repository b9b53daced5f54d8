"""``pipeline inspect-cache``: a human (or JSON) summary of a teacher cache."""

from __future__ import annotations

from cache_schema import cache_stats, open_cache, validate_cache
from cache_schema.integrity import has_digests


def cache_summary(path: str, validate: bool = False) -> dict:
    """Everything a person checks before training on a cache, as a JSON-able dict."""
    cache = open_cache(path)
    if validate:
        validate_cache(cache, deep=True)
    meta = cache.meta
    summary = {
        "path": str(path),
        "format": meta.get("format"),
        "format_version": meta.get("format_version"),
        "top_k": meta.get("top_k"),
        "logprob_mode": meta.get("logprob_mode"),
        "vocab_size": meta.get("vocab_size"),
        "fingerprints": meta.get("fingerprints", {}),
        "created_at": meta.get("created_at"),
        "completed_at": meta.get("completed_at"),
        "has_relations": cache.has_relations,
        "teacher_model": meta.get("teacher_model"),
        "backend": meta.get("backend"),
        "teacher_server": meta.get("teacher_server"),
        "validated": bool(validate),
        # Parts written before per-file digests existed are checked structurally (and by the part checksum).
        "parts_with_digests": sum(has_digests(part.commit) for part in cache.parts),
        "parts": len(cache.parts),
    }
    summary.update(cache_stats(cache))
    return summary


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _served_by(server: dict | None) -> str:
    if not server:
        return ""
    return f"; served as {server.get('model_name')} by vLLM {server.get('vllm_version')}"


def _sampled_lines(sampled: dict | None) -> list[str]:
    if not sampled:
        return []
    return [(f"sampled targets  S={sampled['samples_per_position']} draws at τ={sampled['temperature']:g}; unique "
             f"ids per position mean {sampled['unique_mean'] or 0:.1f}, p50 {sampled['unique_p50'] or 0:.0f}, p95 "
             f"{sampled['unique_p95'] or 0:.0f}; {sampled['bytes_per_position']:.1f} bytes per distilled token")]


def format_summary(s: dict) -> str:
    """Render :func:`cache_summary` for a terminal."""
    lines = [
        f"cache            {s['path']}",
        f"format           {s['format']} v{s['format_version']}  (created {s['created_at']}, "
        f"completed {s['completed_at']})",
        f"samples          {s.get('samples', 0):,}",
        f"student tokens   {s.get('student_tokens', 0):,}",
        f"teacher tokens   {s.get('teacher_tokens', 0):,}",
        f"distilled pos.   {s.get('distilled_positions', 0):,}",
        f"top-K            {s['top_k']}  ({s['logprob_mode']}, vocab {s['vocab_size']})",
        f"on disk          {_fmt_bytes(s.get('bytes_on_disk', 0))}  "
        f"({s.get('bytes_per_position', 0):.1f} bytes per distilled position, i.e. per distilled token)",
        f"targets          {s.get('targets', 'topk')}",
        f"top-K encoding   {s.get('encoding', 'plain')}  " + (
            f"({s['bytes_per_kept_entry']:.2f} bytes per kept (id, logprob) entry)" if s.get('bytes_per_kept_entry')
            else "(no top-K rows)"),
        *_sampled_lines(s.get("sampled")),
        f"relations        {'yes' if s['has_relations'] else 'no'}",
        f"teacher          {s.get('teacher_model')}  ({s.get('backend')}{_served_by(s.get('teacher_server'))})",
    ]
    kept = s.get("kept_mass") or {}
    if kept:
        order = [k for k in ("min", "p1", "p10", "median", "p90", "max", "mean") if k in kept]
        lines.append("kept mass Σexp   " + "  ".join(f"{k} {kept[k]:.4f}" for k in order))
    temperatures = s.get("temperatures") or [1.0]
    lines.append("temperatures     " + ", ".join(f"{t:g}" for t in temperatures)
                 + ("  (tail tempered exactly at each)" if len(temperatures) > 1 else
                    "  (tail handling 'tail' trains at τ=1 only; 'renormalize' at any τ)"))
    for tau, tempered in (s.get("tempered_kept_mass") or {}).items():
        if tempered:
            lines.append(f"kept mass at τ={tau:<4}" + "  ".join(f"{k} {tempered[k]:.4f}" for k in ("min", "median",
                                                                                                  "mean")))
    sources = s.get("sources")
    if sources is None:
        lines.append("sources          not recorded (format version 1 cache)")
    for name, row in (sources or {}).items():
        lines.append(f"source           {name:<16} {row['samples']:,} samples, {row['student_tokens']:,} student "
                     f"tokens, {row['distilled_positions']:,} distilled positions")
    for name, value in sorted(s["fingerprints"].items()):
        lines.append(f"fingerprint      {name:<10} {value}")
    if s.get("validated"):
        lines.append("validation       deep validation passed")
        with_digests, parts = s["parts_with_digests"], s["parts"]
        lines.append(f"integrity        every file of all {parts} part(s) matches its recorded checksum"
                     if with_digests == parts else
                     f"integrity        {parts - with_digests} of {parts} part(s) record no per-file checksums "
                     "(written by older code): checked structurally and by the part checksum only")
    return "\n".join(lines)
