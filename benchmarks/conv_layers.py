"""Each convolution of a model timed alone, forward and backward, in both memory layouts.

    python benchmarks/conv_layers.py --model seed_cnn --image-size 224 --batch-size 512 \
        --device cuda

The model's convolutions are found by running it once; each is then copied and timed on its own
at the training batch: forward, and forward with backward (the gradients of the input, unless
it is the model's first layer, and of the weights and bias), in channels_last and in PyTorch's
default layout, under the training step's autocast (bf16 on a GPU, float32 on a CPU), with cuDNN's
algorithm search on as in training. It tells which layers take a step's time, and whether any
would be faster in the other layout. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from pneumoscan.config import build_config  # noqa: E402
from pneumoscan.device import autocast, configure_device, resolve_device, sync  # noqa: E402
from pneumoscan.train import build_model  # noqa: E402

LAYOUTS = {"channels_last": torch.channels_last, "default": torch.contiguous_format}


def model_convolutions(model: nn.Module, in_chans: int, size: int) -> list[tuple[str, nn.Conv2d,
                                                                                 tuple]]:
    """(name, module, input shape without the batch) of each convolution, in forward order."""
    found = []
    hooks = [m.register_forward_pre_hook(
        lambda m, args, name=name: found.append((name, m, tuple(args[0].shape[1:]))))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_chans, size, size))
    for h in hooks:
        h.remove()
    return found


def time_layer(conv: nn.Conv2d, shape: tuple, batch: int, layout, device: torch.device, *,
               input_grad: bool, iters: int, warmup: int) -> tuple[float, float]:
    """Milliseconds for a forward, and for a forward with backward.

    The input comes in autocast's precision, as from the layer before in training (bf16 on a
    GPU); the backward computes the gradients training needs and nothing more: no cast of the
    input's gradient, no accumulation into ``.grad``.
    """
    conv = copy.deepcopy(conv).to(device).to(memory_format=layout)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, *shape, device=device, dtype=dtype).contiguous(memory_format=layout)
    x.requires_grad_(input_grad)
    wrt = [*conv.parameters(), *([x] if input_grad else [])]

    def forward():
        with autocast(device):
            return conv(x)

    grad_out = torch.ones_like(forward())

    def forward_backward():
        torch.autograd.grad(forward(), wrt, grad_out)

    timings = []
    for fn in (forward, forward_backward):
        for _ in range(warmup):
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        timings.append((time.perf_counter() - start) / iters * 1000)
    return timings[0], timings[1]


def describe(conv: nn.Conv2d) -> str:
    kind = ("depthwise" if conv.groups == conv.in_channels and conv.groups > 1
            else "pointwise" if conv.kernel_size == (1, 1) else "full")
    return f"{kind} {conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--recipe", help="default: seed for seed_cnn, strong otherwise")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    configure_device(device)
    recipe = args.recipe or ("seed" if args.model == "seed_cnn" else "strong")
    cfg = build_config(recipe, device.type, {"model": args.model, "image_size": args.image_size})
    torch.manual_seed(0)
    model = build_model(cfg)
    rows = []
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, on {device}: "
          "milliseconds for a forward / a forward and backward")
    print(f"  {'layer':<34}{'kind':<16}{'input':<18}" + "".join(
        f"{name:>24}" for name in LAYOUTS))
    for i, (name, conv, shape) in enumerate(model_convolutions(model, cfg.in_chans,
                                                                 cfg.image_size)):
        row = {"layer": name, "kind": describe(conv), "input": list(shape),
               "out_channels": conv.out_channels}
        for layout_name, layout in LAYOUTS.items():
            fwd, both = time_layer(conv, shape, args.batch_size, layout, device,
                                   input_grad=i > 0, iters=args.iters, warmup=args.warmup)
            row[layout_name] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3)}
        rows.append(row)
        print(f"  {name:<34}{row['kind']:<16}{'x'.join(map(str, shape)):<18}" + "".join(
            f"{row[n]['forward_ms']:>11.3f} / {row[n]['forward_backward_ms']:>8.3f}"
            for n in LAYOUTS))
    totals = {n: round(sum(r[n]["forward_backward_ms"] for r in rows), 3) for n in LAYOUTS}
    best = round(sum(min(r[n]["forward_backward_ms"] for n in LAYOUTS) for r in rows), 3)
    print("  forward and backward of every convolution: "
          + ", ".join(f"{n} {t:.3f} ms" for n, t in totals.items())
          + f"; each in its faster layout {best:.3f} ms")
    print(json.dumps({
        "benchmark": "conv_layers", "model": args.model, "image_size": args.image_size,
        "batch_size": args.batch_size, "device": device.type, "layers": rows,
        "total_forward_backward_ms": totals, "best_layouts_ms": best, "torch": torch.__version__,
        "command": "python benchmarks/conv_layers.py " + shlex.join(argv or sys.argv[1:]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
