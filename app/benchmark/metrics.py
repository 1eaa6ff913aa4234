"""RequestResults of one benchmark run -> vLLM's metrics (same names, same formulas) + images/s.

Caller: app.benchmark.serve. TPOT of a request = (E2E latency - TTFT) / (output tokens - 1), for
requests with more than one output token; ITL = every gap between streamed text chunks; percentiles
are numpy's (linear interpolation), as in `vllm bench serve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.benchmark.requests import RequestResult

METRIC_TITLES = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
                 "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}


@dataclass(frozen=True)
class RunInfo:
    """What the run was, for the printed block and the JSON."""

    duration_s: float
    num_images_sent: int            # by successful requests
    max_concurrency: int | None
    request_rate: float
    percentile_metrics: tuple[str, ...]   # of METRIC_TITLES
    metric_percentiles: tuple[float, ...]


def _seconds_by_metric(results: list[RequestResult]) -> dict[str, list[float]]:
    done = [r for r in results if r.success]
    return {"ttft": [r.ttft for r in done],
            "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
            "itl": [gap for r in done for gap in r.itl],
            "e2el": [r.latency for r in done]}


def compute_metrics(results: list[RequestResult], info: RunInfo) -> dict:
    """The result JSON's numbers (vLLM's keys; times in ms)."""
    done = [r for r in results if r.success]
    total_input, total_output = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    duration = info.duration_s
    metrics = {"duration": duration, "completed": len(done), "failed": len(results) - len(done),
               "total_input_tokens": total_input, "total_output_tokens": total_output,
               "request_throughput": len(done) / duration, "output_throughput": total_output / duration,
               "total_token_throughput": (total_input + total_output) / duration,
               "num_images": info.num_images_sent, "image_throughput": info.num_images_sent / duration,
               "num_without_usage": sum(1 for r in done if not r.has_usage)}
    for name, seconds in _seconds_by_metric(results).items():
        values_ms = np.asarray(seconds or [0.0]) * 1e3
        metrics[f"mean_{name}_ms"] = float(values_ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(values_ms))
        metrics[f"std_{name}_ms"] = float(values_ms.std())
        for p in info.metric_percentiles:
            metrics[f"p{p:g}_{name}_ms"] = float(np.percentile(values_ms, p))
    return metrics


def result_block(metrics: dict, info: RunInfo) -> str:
    """The text `vllm bench serve` prints, plus image throughput."""
    rows = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
            f"{'Successful requests:':<40} {metrics['completed']:<10}",
            f"{'Failed requests:':<40} {metrics['failed']:<10}"]
    if info.max_concurrency is not None:
        rows.append(f"{'Maximum request concurrency:':<40} {info.max_concurrency:<10}")
    rows.append(f"{'Request rate configured (RPS):':<40} {info.request_rate:<10.2f}")
    for label, key, fmt in (("Benchmark duration (s):", "duration", ".2f"),
                            ("Total input tokens:", "total_input_tokens", ""),
                            ("Total generated tokens:", "total_output_tokens", ""),
                            ("Total input images:", "num_images", ""),
                            ("Request throughput (req/s):", "request_throughput", ".2f"),
                            ("Output token throughput (tok/s):", "output_throughput", ".2f"),
                            ("Total Token throughput (tok/s):", "total_token_throughput", ".2f"),
                            ("Image throughput (images/s):", "image_throughput", ".2f")):
        rows.append(f"{label:<40} {metrics[key]:<10{fmt}}")
    for name in info.percentile_metrics:
        title, short = METRIC_TITLES[name]
        rows.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        rows.append(f"{f'Mean {short} (ms):':<40} {metrics[f'mean_{name}_ms']:<10.2f}")
        rows.append(f"{f'Median {short} (ms):':<40} {metrics[f'median_{name}_ms']:<10.2f}")
        for p in info.metric_percentiles:
            rows.append(f"{f'P{p:g} {short} (ms):':<40} {metrics[f'p{p:g}_{name}_ms']:<10.2f}")
    rows.append("=" * 50)
    return "\n".join(rows)


def per_request_lists(results: list[RequestResult]) -> dict:
    """vLLM's per-request arrays in the result JSON (seconds, as vLLM stores them)."""
    return {"input_lens": [r.prompt_tokens for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "generated_texts": [r.generated_text for r in results], "errors": [r.error for r in results]}
