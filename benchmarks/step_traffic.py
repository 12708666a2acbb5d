"""What one training image costs the step in memory traffic and arithmetic, and the throughput
that bounds on a GPU.

    python benchmarks/step_traffic.py --model seed_cnn --image-size 224
    python benchmarks/step_traffic.py --model resnet18 --image-size 224 --bandwidth-tbs 4.8 \
        --bf16-tflops 990

The project's step (the recipe's augmentation, normalisation, channels_last, the model's forward
and backward in bf16 as autocast runs them on a GPU) runs on the CPU under a dispatch mode that
records every aten operation: the bytes of the tensors it reads and writes and, for
convolutions and matrix products, its FLOPs (torch's own counting). It runs at two batch sizes;
the difference is one image's share, so the weights' and the optimizer's per-step traffic drop
out (at the large batches of a GPU they are a small share anyway).

Two traffic figures:
- every operation as eager PyTorch runs it: each reads its inputs and writes its outputs;
- the convolutions and matrix products alone: as if every elementwise operation, BatchNorm and
  pooling were fused into them for free. No real implementation gets below this with these
  kernels (torch.compile fuses elementwise operations with each other, not into cuDNN's
  convolutions), so the images per second it gives at the GPU's bandwidth is an upper bound.

The GPU's figures default to what one H200 was measured to do through PyTorch: a device-to-device
copy at 4.3 TB/s and a large bf16 matrix product at 790 TFLOP/s (its datasheet says 4.8 TB/s and
990). The last line printed is one JSON object with the figures and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from pneumoscan.augment import augment_batch  # noqa: E402
from pneumoscan.config import build_config  # noqa: E402
from pneumoscan.train import build_model, weighted_loss  # noqa: E402

aten = torch.ops.aten
# The operations cuDNN and cuBLAS run; everything else is elementwise, a reduction or pooling.
COMPUTE = {aten.convolution, aten.convolution_backward, aten.mm, aten.addmm, aten.bmm}


class Traffic(TorchDispatchMode):
    """Bytes read and written and FLOPs of each aten operation, summed by operation."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.flops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in (aten.detach, aten._unsafe_view):
            return out  # a view of the same memory: nothing moves
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        if func.overloadpacket in flop_registry:
            self.flops[name] += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def measure(cfg, model, batch: int) -> Traffic:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=g)
    labels = torch.arange(batch) % 2
    traffic = Traffic()
    with traffic:
        # TrainStep's tensor work, with the GPU's autocast precision (bf16) on the CPU.
        x = images.unsqueeze(1).float().div_(255.0)
        x = augment_batch(x, cfg.augment, g)
        x = (x - cfg.mean) / cfg.std
        if cfg.in_chans > 1:
            x = x.expand(-1, cfg.in_chans, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = weighted_loss(logits, labels, None, cfg.label_smoothing)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return traffic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--recipe", help="default: seed for seed_cnn, strong otherwise")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bandwidth-tbs", type=float, default=4.3, help="GPU memory, TB/s")
    p.add_argument("--bf16-tflops", type=float, default=790.0, help="dense bf16, TFLOP/s")
    p.add_argument("--top", type=int, default=8, help="operations listed, largest first")
    args = p.parse_args(argv)

    recipe = args.recipe or ("seed" if args.model == "seed_cnn" else "strong")
    cfg = build_config(recipe, "cuda", {"model": args.model, "image_size": args.image_size})
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last).train()
    small, large = measure(cfg, model, 2), measure(cfg, model, 4)

    def per_image(small_counts, large_counts) -> dict[str, float]:
        names = set(small_counts) | set(large_counts)
        return {n: (large_counts.get(n, 0) - small_counts.get(n, 0)) / 2 for n in names}

    mb = {n: b / 1e6 for n, b in per_image(small.bytes, large.bytes).items()}
    gflop = sum(per_image(small.flops, large.flops).values()) / 1e9
    all_mb = sum(mb.values())
    compute_mb = sum(v for n, v in mb.items() if getattr(aten, n) in COMPUTE)
    seconds = {"eager": all_mb * 1e6 / (args.bandwidth_tbs * 1e12),
               "compute ops only": compute_mb * 1e6 / (args.bandwidth_tbs * 1e12)}
    arithmetic_s = gflop * 1e9 / (args.bf16_tflops * 1e12)

    print(f"{args.model} at {args.image_size} px ({recipe} recipe's step, bf16): per training "
          f"image {gflop:.2f} GFLOP, {all_mb:.1f} MB moved by eager PyTorch, {compute_mb:.1f} MB "
          "by the convolutions and matrix products alone")
    for name, v in sorted(mb.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:<28}{v:8.1f} MB  {v / all_mb:6.1%}")
    bounds = {k: round(1 / max(s, arithmetic_s)) for k, s in seconds.items()}
    print(f"bounds at {args.bandwidth_tbs} TB/s and {args.bf16_tflops:g} TFLOP/s: "
          f"{bounds['eager']:,} images/s with eager's traffic, {bounds['compute ops only']:,} "
          f"with the convolutions' alone (arithmetic alone: {1 / arithmetic_s:,.0f})")
    print(json.dumps({
        "benchmark": "step_traffic", "model": args.model, "image_size": args.image_size,
        "recipe": recipe, "gflop_per_image": round(gflop, 3),
        "mb_per_image": {"eager": round(all_mb, 1), "compute_ops_only": round(compute_mb, 1)},
        "images_per_s_bound": bounds,
        "arithmetic_bound_images_per_s": round(1 / arithmetic_s),
        "bandwidth_tbs": args.bandwidth_tbs, "bf16_tflops": args.bf16_tflops,
        "torch": torch.__version__,
        "command": "python benchmarks/step_traffic.py " + shlex.join(argv or sys.argv[1:]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
