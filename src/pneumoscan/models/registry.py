"""A registry of small factory functions, so that a model is built the same way everywhere."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pneumoscan.errors import PneumoscanError

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn`` under its own name; it takes ``in_chans``, ``num_classes`` and options."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def is_known_model(name: str) -> bool:
    _load_builtin_models()
    if name in _REGISTRY:
        return True
    from pneumoscan.models import timm_models

    return timm_models.is_timm_model(name)


def create_model(
    name: str, *, in_chans: int = 1, num_classes: int = 2, image_size: int = 224, **kwargs
) -> nn.Module:
    """Build a registered model, or any timm model by name (``timm:NAME`` or plain ``NAME``)."""
    _load_builtin_models()
    if name in _REGISTRY:
        model = _REGISTRY[name](
            in_chans=in_chans, num_classes=num_classes, image_size=image_size, **kwargs
        )
    elif is_known_model(name):
        from pneumoscan.models import timm_models

        model = timm_models.create_timm_model(
            name, in_chans=in_chans, num_classes=num_classes, **kwargs
        )
    else:
        raise unknown_model_error(name)
    if not hasattr(model, "gradcam_layer"):
        raise TypeError(f"model {name!r} does not name its gradcam_layer")
    return model


def check_input_size(name: str, *, in_chans: int, image_size: int) -> nn.Module:
    """Raise PneumoscanError unless model ``name`` takes (in_chans, S, S) images.

    Shapes only, on the meta device (no weights, no arithmetic): a run learns before decoding
    anything that, say, seed_cnn needs sizes divisible by 32 or ConvNeXt at least 32 px. A model
    that cannot be built on the meta device is built for real on the CPU instead. Returns the
    model it built (in eval mode), enough to count parameters.
    """
    import torch

    def build(device: str) -> nn.Module:
        with torch.device(device):
            return create_model(name, in_chans=in_chans, image_size=image_size).eval()

    def reason(e: BaseException) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]

    device = "meta"
    try:
        try:
            model = build(device)
        except PneumoscanError:
            raise
        except Exception:
            device = "cpu"
            model = build(device)
        with torch.device(device), torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
        return model
    except PneumoscanError:
        raise
    except Exception as e:
        raise PneumoscanError(
            f"--model {name} cannot take {image_size} x {image_size} px images ({reason(e)}); "
            "choose another --image-size"
        ) from None


def gradcam_module(model: nn.Module) -> nn.Module:
    """The module a model names as its Grad-CAM target (unwrapping DDP and compile wrappers)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return model.get_submodule(model.gradcam_layer)


def keras_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) counted the way Keras does: BatchNorm moving statistics are parameters.

    PyTorch keeps running mean and variance as buffers; Keras lists them as non-trainable weights,
    so its totals are larger by two numbers per BatchNorm channel.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    moving = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return trainable + frozen + moving, trainable


def _load_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from pneumoscan.models import seed_cnn, timm_models  # noqa: F401


def unknown_model_error(name: str) -> PneumoscanError:
    return PneumoscanError(
        f"unknown model {name!r}{_nearest_names(name)}: choose one of "
        f"{', '.join(list_models())} or a timm model name"
    )


def _nearest_names(name: str) -> str:
    """' (did you mean ...?)' for a misspelt name, or the tags an architecture has when only
    its pretrained tag is unknown; '' when nothing is near."""
    import difflib

    try:
        import timm
    except ImportError:
        # Guessing among the built-in names alone would steer a valid timm name wrong.
        return " (timm is not installed, so timm's names cannot be checked: pip install timm)"
    bare = name.removeprefix("timm:")
    arch, dot, tag = bare.partition(".")
    if dot and timm.is_model(arch):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        return f" ({arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'})"
    lowered = {k.lower(): k for k in list_models() + timm.list_models()}
    near = difflib.get_close_matches(bare.lower().replace("-", "_"), lowered, n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(lowered[n] for n in near)}?)" if near else ""
