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


def _bytes(value: Any) -> str:
    return format_value(value, "bytes")


def summary_line(result: dict[str, Any]) -> str:
    """The few figures of a path that fit on one line."""
    m, kind = result["metrics"], result["kind"]
    if result["status"] != "ok":
        return (result["error"] or "")[:160]
    if kind == "environment":
        return (f"{m['device_name']}, torch {m['torch']}, CUDA {m['cuda'] or '-'}, NCCL {m['nccl'] or '-'}, "
                f"Triton {m['triton'] or '-'}, fp32 matmul {m['float32_matmul_precision']}, "
                f"peak {format_value(m['peak_bf16_tflops'])} TFLOP/s")
    if kind in ("train", "throughput"):
        mfu = f", MFU {format_value(m['mfu'], 'percent')}" if m["mfu"] is not None else ""
        peak = f", peak {_bytes(m['peak_cuda_bytes'])}" if m["peak_cuda_bytes"] is not None else ""
        loss = f", loss {m['loss_first']:.2f} -> {m['loss_last']:.2f}" if kind == "train" else ""
        return f"{m['tokens_per_s']:,.0f} tok/s{mfu}{peak}{loss}"
    if kind == "compile":
        return (f"compile {format_value(m['compile_s'], 'seconds')}, {m['unique_graphs']} graph(s), "
                f"{m['graph_breaks']} break(s), loss vs eager {m['max_loss_rel_diff']:.1e}")
    if kind == "optimizer_state":
        return (f"state fp32 for {', '.join(m['state_dtypes'])}; bf16 exp_avg_sq "
                f"{format_value(m['ratchet_ratio'], 'ratio')} the fp32 one after {m['ratchet_steps']} steps")
    if kind == "dynamics":
        extra = m["extra_over_targeted_fp32"]
        return (f"measured at steps {m['measured_steps']}; extra peak {_bytes(m['extra_bytes'])} = "
                f"{format_value(extra, 'ratio')} the targeted fp32 weights" if extra is not None
                else f"measured at steps {m['measured_steps']} (no CUDA peak on this device)")
    if kind == "trainer":
        if m["warm_start_steps"] is not None:
            return f"warm start {m['warm_start_steps']} steps, val loss {m['val_loss']:.3f}, W0 state cleared"
        faked = f", checkpoint with {m['rng_states_saved']} RNG states" if m["rng_states_saved"] else ""
        return (f"val loss {m['val_loss']:.3f}, {m['resumed_val_loss']:.3f} resumed from step "
                f"{m['checkpoint_step']}{faked}")
    if kind == "memory":
        estimated = (f" (estimated {_bytes(m['estimate_bytes'])}, {_bytes(m['estimate_bytes_checkpointed'])})"
                     if m.get("estimate_bytes") else "")
        return (f"peak {_bytes(m['peak_bytes'])} ({_bytes(m['peak_bytes_checkpointed'])} checkpointed){estimated}, "
                f"activations {_bytes(m['activation_bytes'])} -> {_bytes(m['activation_bytes_checkpointed'])}")
    if kind == "projector":
        return (f"rank {m['rank']}: exact SVD {format_value(m['exact_s'], 'seconds')}, "
                f"randomized {format_value(m['randomized_s'], 'seconds')}")
    if kind == "process_group":
        return (f"{m['backend']} init {format_value(m['init_s'], 'seconds')}, all_reduce "
                f"{format_value(m['all_reduce_s'], 'seconds')}")
    if kind == "infer":
        return (f"{m['dense']} / {m['factorized']} latency {format_value(m['speedup_geomean'], 'ratio')} "
                f"(published {m['published_speedup'].split(' ')[0]})")
    if kind == "landscape":
        return f"landscape point = {m['landscape_over_forward']:.2f} forwards"
    return f"{m['world_size']} processes, val loss {m['val_loss']:.3f}"


def print_summary(payload: dict[str, Any]) -> None:
    rows = [{**r, "summary": summary_line(r)} for r in payload["paths"]]
    counts = payload["counts"]
    device = (payload["device"] or {}).get("name", "an unknown device")
    print_table(
        f"bench gpu on {device}: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['out_of_time']} out of time, {payload['wall_s']:.0f}s",
        rows,
        [Column("path", "path", "text"), Column("status", "status", "text"), Column("seconds", "time", "seconds"),
         Column("summary", "figures", "text")],
    )
    if "file" in payload:
        print(f"gpu check json: {payload['file']}")
    if payload["log"]:
        print(f"gpu check log (tracebacks): {payload['log']}")
    print("gpu check: " + ("every path passed" if payload["ok"] else "FAILED (see the table and the JSON)"))
