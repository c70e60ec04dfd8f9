"""Shared machinery of the benchmarks: timing, alternating repeats, ratios, writers, the table.

Every benchmark compares methods (or implementations) against a baseline, by default `full`.
Timings are wall-clock medians after warm-up; on CUDA the device is synchronised around every
timed region, because kernel launches return before the work is done. Methods are measured in
a rotated order on every repeat, so slow drift of the machine (thermal throttling, other
processes on a shared CPU) hits every method alike instead of biasing whichever runs last.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankscope.config import REFERENCE_METHOD
from rankscope.errors import ConfigError, RankscopeError
from rankscope.io import write_json_atomic

log = logging.getLogger("rankscope.bench")



# ---------------------------------------------------------------------------------------------
# devices and timing


def resolve_bench_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto`; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but none is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported by the benchmarks; use cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, with the device idle before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[0] for _ in range(repeats)]


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """The order for one repeat: the list rotated by `repeat`, so every name takes every slot."""
    if not names:
        return []
    shift = repeat % len(names)
    return list(names[shift:]) + list(names[:shift])


def run_alternating(
    names: Sequence[str], repeats: int, measure: Callable[[str, int], Any]
) -> dict[str, list[Any]]:
    """Call `measure(name, repeat)` for every name in every repeat, in rotated order."""
    results: dict[str, list[Any]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in rotated(names, repeat):
            results[name].append(measure(name, repeat))
    return results


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def geometric_mean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# methods


def select_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from "all" or "a,b,c": validated, `full` first (it is the baseline)."""
    from rankscope import methods

    if isinstance(spec, str):
        requested = methods.names() if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        requested = list(spec)
    if not requested:
        raise ConfigError("--methods is empty; pass 'all' or a comma-separated list such as full,galore")
    for name in requested:
        methods.get(name)  # unknown names raise with a did-you-mean suggestion
    ordered = [REFERENCE_METHOD] + [name for name in dict.fromkeys(requested) if name != REFERENCE_METHOD]
    return ordered


# ---------------------------------------------------------------------------------------------
# records and ratios


def add_ratios(
    records: list[dict[str, Any]], metrics: Sequence[str], key: str = "method", baseline: str = REFERENCE_METHOD
) -> None:
    """Add `<metric>_ratio = value / baseline's value` to every record (None where undefined)."""
    base = next((r for r in records if r.get(key) == baseline), None)
    for record in records:
        for metric in metrics:
            value = record.get(metric)
            reference = base.get(metric) if base is not None else None
            ok = (
                isinstance(value, (int, float)) and isinstance(reference, (int, float))
                and reference != 0 and math.isfinite(value) and math.isfinite(reference)
            )
            record[f"{metric}_ratio"] = float(value) / float(reference) if ok else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: library versions, threads, the device."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        # A busy machine makes every timing noisier; the load says how busy this one was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    return info


# ---------------------------------------------------------------------------------------------
# output: JSON, CSV, PNG, terminal table


@dataclass
class Column:
    """One column of the terminal table: record key, header, and how to show the value."""

    key: str
    header: str
    kind: str = "number"  # number | seconds | bytes | ratio | count | text | percent

    def format(self, value: Any) -> str:
        return format_value(value, self.kind)


def format_value(value: Any, kind: str = "number") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "text" or not isinstance(value, (int, float)):
        return str(value)
    if kind == "seconds":
        magnitude = abs(value)
        if magnitude >= 1:
            return f"{value:.3f} s"
        if magnitude >= 1e-3:
            return f"{value * 1e3:.2f} ms"
        return f"{value * 1e6:.1f} µs"
    if kind == "bytes":
        return f"{value / 2**20:.2f} MiB"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "count":
        return f"{int(value):,}"
    if kind == "percent":
        return f"{100 * value:.2f}%"
    if abs(value) >= 1e4 or (0 < abs(value) < 1e-2):
        return f"{value:.3g}"
    return f"{value:.2f}"


def print_table(title: str, records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column.header, justify="left" if column.kind == "text" else "right")
    for record in records:
        table.add_row(*(column.format(record.get(column.key)) for column in columns))
    # A wide console so piped output (CI logs, reports) keeps whole rows.
    Console(width=max(120, 14 * len(columns))).print(table)


def _plain(value: Any) -> Any:
    """JSON/CSV-safe values: tensors and numpy scalars to Python numbers, NaN/inf to None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """`payload` as strict JSON (tensors as numbers or lists, NaN/inf as null), written atomically."""
    write_json_atomic(path, _plain(payload))


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for record in records:
        keys.extend(k for k in record if k not in keys)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for record in records:
            row = _plain(record)
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})


@dataclass
class RatioPlot:
    """A bar chart of ratios to the baseline, one group of bars per record."""

    metrics: Sequence[tuple[str, str]]  # (record key of a ratio, legend label)
    title: str
    ylabel: str = "ratio to full-rank (1.0 = same as full)"
    key: str = "method"
    log_scale: bool = False


def plot_ratios(path: Path, records: Sequence[dict[str, Any]], plot: RatioPlot) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    labels = [str(r.get(plot.key)) for r in records]
    n_metrics = max(1, len(plot.metrics))
    width = 0.8 / n_metrics
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2.5) + (2.5 if len(plot.metrics) > 1 else 0.0), 4.5))
    for index, (metric, label) in enumerate(plot.metrics):
        values = [r.get(metric) for r in records]
        heights = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
        positions = [i + (index - (n_metrics - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, heights, width=width, label=label)
        for bar, value in zip(bars, values):
            text = f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, rotation=90 if n_metrics > 2 else 0)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_xlabel(plot.key)
    ax.set_ylabel(plot.ylabel)
    if plot.log_scale:
        ax.set_yscale("log")
    ax.set_title(plot.title)
    if len(plot.metrics) > 1:
        # Outside the axes, so no bar is ever hidden behind it.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BenchResult:
    """What a sub-benchmark hands back: its records plus settings, environment and side tables."""

    name: str
    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # extra CSVs: suffix -> rows
    files: dict[str, Path] = field(default_factory=dict)


def write_result(result: BenchResult, out_dir: str | Path | None, plot: RatioPlot | None,
                 extra_plot: Callable[[Path], None] | None = None) -> BenchResult:
    """DIR/<name>.json (meta + records + side tables), DIR/<name>.csv, DIR/<name>_<table>.csv, DIR/<name>.png."""
    if out_dir is None:
        return result
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RankscopeError(f"cannot create the output folder {out}: {exc.strerror}; pass a writable --out") from None
    json_path = out / f"{result.name}.json"
    write_json(json_path, {"benchmark": result.name, "meta": result.meta, "records": result.records,
                           **{f"table_{k}": v for k, v in result.tables.items()}})
    result.files["json"] = json_path
    csv_path = out / f"{result.name}.csv"
    write_csv(csv_path, result.records)
    result.files["csv"] = csv_path
    for suffix, rows in result.tables.items():
        side = out / f"{result.name}_{suffix}.csv"
        write_csv(side, rows)
        result.files[f"csv_{suffix}"] = side
    if plot is not None:
        png = out / f"{result.name}.png"
        plot_ratios(png, result.records, plot)
        result.files["png"] = png
    if extra_plot is not None:
        extra = out / f"{result.name}_scaling.png"
        extra_plot(extra)
        result.files["png_scaling"] = extra
    return result


def wall_and_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """(wall seconds, process CPU seconds) of one call; CPU seconds only on the CPU device.

    On a shared CPU the wall time includes the time the process waits for a core; its CPU time
    does not (with one thread it is the wall time an idle machine would show), so both are kept.
    """
    cpu_start = time.process_time()
    wall, _ = timed(fn, device)
    return wall, (time.process_time() - cpu_start) if device.type == "cpu" else None
