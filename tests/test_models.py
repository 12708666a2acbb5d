"""The registry contract, checked over every registered model at 64 px on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pneumoscan.errors import PneumoscanError
from pneumoscan.models import (
    check_input_size,
    create_model,
    gradcam_module,
    is_known_model,
    keras_parameter_counts,
    list_models,
    registry,
)

SIZE = 64
CASES = [(name, 1) for name in list_models()] + [("seed_cnn", 3)]


def _undo_zero_init(model: nn.Module) -> None:
    """Set to 1 the norm weights that start at zero (timm's zero-initialised residual branches).

    Such a branch passes no gradient to its earlier layers until that weight moves, by design;
    with it at 1 every parameter must receive a gradient.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and weight is not None:
            if not weight.detach().any():
                nn.init.ones_(weight)


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{c}ch" for n, c in CASES])
def built(request):
    name, in_chans = request.param
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, image_size=SIZE)
    return name, in_chans, model


def test_registry_lists_the_report_cnn_and_standard_backbones():
    names = list_models()
    assert "seed_cnn" in names
    assert {"resnet18", "densenet121", "efficientnet_b0", "convnext_nano"} <= set(names)


def test_forward_shape_finite_and_gradients_reach_every_parameter(built):
    name, in_chans, model = built
    _undo_zero_init(model)
    model.train()
    torch.manual_seed(1)
    x = torch.randn(2, in_chans, SIZE, SIZE)
    logits = model(x)
    assert logits.shape == (2, 2), f"{name}: logits {tuple(logits.shape)}"
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits"

    model.zero_grad(set_to_none=True)
    logits.sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{name}: no trainable parameters"
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable), f"{name}: non-finite grads"
    zero = [n for n, p in trainable if not p.grad.abs().sum() > 0]
    # A few exact zeros can happen by chance (a ReLU unit dead on both images); many cannot.
    assert len(zero) <= max(2, len(trainable) // 50), f"{name}: zero gradient at {zero[:8]}"


def test_gradcam_layer_resolves_to_a_spatial_feature_map(built):
    name, in_chans, model = built
    target = gradcam_module(model)
    assert isinstance(target, nn.Module)
    seen: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, in_chans, SIZE, SIZE))
    finally:
        handle.remove()
    assert seen, f"{name}: {model.gradcam_layer} never ran in forward"
    assert seen[-1].ndim == 4 and seen[-1].shape[0] == 2, (
        f"{name}: {model.gradcam_layer} gives shape {tuple(seen[-1].shape)}, not (N, C, h, w)"
    )


def test_gradcam_module_unwraps_compile_and_ddp_style_wrappers():
    model = create_model("seed_cnn", in_chans=1, image_size=SIZE)
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel exposes
    assert gradcam_module(wrapper) is gradcam_module(model)


def test_seed_cnn_has_the_report_parameter_counts_at_3x224():
    model = create_model("seed_cnn", in_chans=3, image_size=224)
    assert keras_parameter_counts(model) == (6_642_594, 6_640_226)
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 2)


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(PneumoscanError, match="no_such_net_xyz"):
        create_model("no_such_net_xyz", in_chans=1, image_size=SIZE)


@pytest.mark.parametrize("name, known", [
    ("resnet18", True), ("timm:resnet18", True), ("resnet18.a1_in1k", True),
    ("timm:resnet18.a1_in1k", True),
    ("resnet1*", False),  # a pattern of timm.list_models, not a model
    ("resnet18.no_such_tag", False),  # a real architecture with a tag timm does not have
])
def test_timm_names_are_exact(name, known):
    assert is_known_model(name) is known


def _saved_bytes_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[int, dict]:
    """Bytes autograd keeps for backward in one training step, and the gradients it yields."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_seed_cnn_stem_checkpointing_keeps_less_and_changes_nothing():
    torch.manual_seed(0)
    model = create_model("seed_cnn", in_chans=3, image_size=64).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same masks both times
    x = torch.rand(4, 3, 64, 64)
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, x)
    model.checkpoint_stem()
    kept_bytes, kept_grads = _saved_bytes_and_grads(model, x)
    # The stem's two 16-channel full-resolution maps (float32) are no longer kept.
    assert plain_bytes - kept_bytes >= 2 * 4 * 16 * 64 * 64 * 4
    for name, grad in plain_grads.items():
        assert torch.equal(grad, kept_grads[name]), name


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "densenet121", "convnext_nano"])
def test_input_size_check_agrees_with_a_real_forward(name):
    in_chans = 3 if name == "seed_cnn" else 1
    for size in (16, 28, 29, 31, 32, 33, 64):
        try:
            model = create_model(name, in_chans=in_chans, image_size=size).eval()
            with torch.no_grad():
                model(torch.zeros(1, in_chans, size, size))
            real_ok = True
        except (ValueError, RuntimeError):
            real_ok = False
        if real_ok:
            check_input_size(name, in_chans=in_chans, image_size=size)
        else:
            with pytest.raises(PneumoscanError, match=f"cannot take {size} x {size} px images"):
                check_input_size(name, in_chans=in_chans, image_size=size)


def test_input_size_check_builds_for_real_when_the_meta_device_fails(monkeypatch):
    # A model whose constructor cannot run on the meta device is not refused for that.
    real = registry.create_model

    def no_meta(name, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise NotImplementedError("no meta kernel for something")
        return real(name, **kwargs)

    monkeypatch.setattr(registry, "create_model", no_meta)
    check_input_size("resnet10t", in_chans=1, image_size=32)
    with pytest.raises(PneumoscanError, match="seed_cnn needs an image size divisible by 32"):
        check_input_size("seed_cnn", in_chans=3, image_size=48)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("resnt18", "(did you mean resnet18"),
        ("efficientnet-b0", "(did you mean efficientnet_b0"),
        ("seed-cnn", "(did you mean seed_cnn?)"),
        ("resnet18.bogus_tag", "(resnet18 has no pretrained tag 'bogus_tag'; its tags: a1_in1k"),
    ],
)
def test_an_unknown_model_name_says_the_nearest_ones(name, hint):
    pytest.importorskip("timm")
    from pneumoscan.models.registry import unknown_model_error

    assert hint in str(unknown_model_error(name))


def test_without_timm_an_unknown_name_is_not_guessed_among_the_built_in_ones(monkeypatch):
    import sys

    from pneumoscan.models.registry import unknown_model_error

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails, as where not installed
    message = str(unknown_model_error("resnet34"))
    assert "timm is not installed" in message and "did you mean" not in message
