"""Model registry: every network is made by ``create_model(name, ...)``.

Each model takes a (N, C, H, W) float batch and returns (N, 2) logits (NORMAL, PNEUMONIA), and
names the layer Grad-CAM should look at in its ``gradcam_layer`` attribute (a dotted module path).
"""

from pneumoscan.models.registry import (
    check_input_size,
    create_model,
    gradcam_module,
    is_known_model,
    keras_parameter_counts,
    list_models,
    register_model,
)

__all__ = [
    "check_input_size",
    "create_model",
    "gradcam_module",
    "is_known_model",
    "keras_parameter_counts",
    "list_models",
    "register_model",
]
