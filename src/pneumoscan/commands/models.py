"""pneumoscan models: the registered networks and their sizes."""

from __future__ import annotations

import argparse

from pneumoscan.commands.train_options import IMAGE_SIZE, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=IMAGE_SIZE, default=224,
                   help="input size the parameters are counted at")
    p.add_argument(
        "--in-chans",
        type=int_at_least(1),
        default=None,
        help="input channels (default: 3 for seed_cnn as the report, 1 otherwise)",
    )


def run(args: argparse.Namespace) -> int:
    from pneumoscan.errors import PneumoscanError
    from pneumoscan.models import check_input_size, keras_parameter_counts, list_models

    print(f"{'name':18s} {'parameters':>12s} {'trainable':>12s}  Grad-CAM layer")
    for name in list_models():
        in_chans = args.in_chans or (3 if name == "seed_cnn" else 1)
        try:  # shapes only (the meta device): no weight is allocated or initialised
            model = check_input_size(name, in_chans=in_chans, image_size=args.image_size)
        except PneumoscanError as e:
            print(f"{name:18s} {'-':>12s} {'-':>12s}  ({e})")
            continue
        total, trainable = keras_parameter_counts(model)
        print(f"{name:18s} {total:12,d} {trainable:12,d}  {model.gradcam_layer}")
    print(
        f"(at {args.image_size} px; parameters count BatchNorm moving statistics, as Keras does;"
        " any timm model name also works)"
    )
    return 0
