"""The GPU check's table: one line of figures per path."""

from __future__ import annotations

import logging
from typing import Any

from rankscope.bench.common import (
    Column,
    format_value,
    print_table,
)

log = logging.getLogger("rankscope.bench")

def summary_line(result: dict[str, Any]) -> str:
    """The few figures of a path that fit on one line."""
    m = result["metrics"]
    if result["status"] != "ok":
        return (result["error"] or "")[:100]
    if result["kind"] == "train":
        mfu = f", MFU {format_value(m['mfu'], 'percent')}" if m["mfu"] is not None else ""
        peak = (f", peak {format_value(m['peak_cuda_bytes'], 'bytes')} (formula {format_value(m['formula_bytes'], 'bytes')})"
                if m["peak_cuda_bytes"] is not None else "")
        return f"{m['tokens_per_s']:,.0f} tok/s{mfu}{peak}, loss {m['loss_first']:.2f} -> {m['loss_last']:.2f}"
    if result["kind"] == "infer":
        return (f"{m['dense']} / {m['factorized']} latency {format_value(m['speedup_geomean'], 'ratio')} "
                f"(published {m['published_speedup'].split(' ')[0]})")
    if result["kind"] == "landscape":
        return f"landscape point = {m['landscape_over_forward']:.2f} forwards"
    if result["kind"] == "trainer":
        return f"val loss {m['val_loss']:.3f}, {m['resumed_val_loss']:.3f} resumed from step {m['checkpoint_step']}"
    return f"{m['world_size']} processes, val loss {m['val_loss']:.3f}"


def print_summary(payload: dict[str, Any]) -> None:
    rows = [{**r, "summary": summary_line(r)} for r in payload["paths"]]
    counts = payload["counts"]
    print_table(
        f"bench gpu on {payload['device']['name']}: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['out_of_time']} out of time, {payload['wall_s']:.0f}s",
        rows,
        [Column("path", "path", "text"), Column("status", "status", "text"), Column("seconds", "time", "seconds"),
         Column("summary", "figures", "text")],
    )
    if "file" in payload:
        print(f"gpu check json: {payload['file']}")
    print("gpu check: " + ("every path passed" if payload["ok"] else "FAILED (see the table and the JSON)"))
