"""Cost of one landscape point and one interpolation point against one plain forward pass.

Both are measured over the same probe set on the same model, so the ratio shows the overhead of
writing θ + α·d (or (1−α)θ_a + αθ_b) from the fp32 master copy: the target is a landscape
point <= 1.15 forward passes. Prints the figures; asserts nothing.

    python benchmarks/analysis_speed.py                      # tiny preset, CPU
    python benchmarks/analysis_speed.py --preset 60m --device cuda --probe-size 256 --seq-len 256
    python benchmarks/analysis_speed.py --method lora         # a method's native parameters
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from rankscope.analysis.pipeline import Probe, measure_point_cost
from rankscope.models import build_model, get_preset


def build(preset: str, method: str, layers: int | None) -> torch.nn.Module:
    model_cfg = get_preset(preset)
    if layers:
        model_cfg = dataclasses.replace(model_cfg, num_layers=layers)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if method != "full":
        from rankscope import methods

        cls = methods.get(method)
        model = cls(cls.default_settings(preset, model_cfg), model_cfg, preset).parameterize(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--method", default="full")
    parser.add_argument("--layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--probe-size", type=int, default=64, help="probe sequences")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = build(args.preset, args.method, args.layers).to(device).eval()
    vocab = model.embed_tokens.num_embeddings
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, vocab, (args.probe_size, args.seq_len), generator=generator)
    probe = Probe(sequences, args.batch_size, device)
    result = measure_point_cost(model, probe, repeats=args.repeats)

    print(f"{args.preset} / {args.method} on {result['device']}: {result['parameters']:,} parameters, "
          f"probe {result['probe_sequences']} x {args.seq_len} tokens, batch {result['batch_size']}")
    print(f"plain forward over the probe set : {result['forward_s'] * 1e3:9.2f} ms")
    print(f"landscape point                  : {result['landscape_point_s'] * 1e3:9.2f} ms "
          f"(ratio {result['landscape_ratio']:.3f}, target <= 1.15)")
    print(f"interpolation point              : {result['interpolation_point_s'] * 1e3:9.2f} ms "
          f"(ratio {result['interpolation_ratio']:.3f})")
    print(f"  of which writing θ + α·d       : {result['landscape_write_s'] * 1e3:9.2f} ms "
          f"(1 + write/forward = {1 + result['landscape_write_s'] / result['forward_s']:.3f})")
    print(f"  of which writing (1−α)θa + αθb : {result['interpolation_write_s'] * 1e3:9.2f} ms "
          f"(1 + write/forward = {1 + result['interpolation_write_s'] / result['forward_s']:.3f})")


if __name__ == "__main__":
    main()
