"""Standard backbones from timm, behind the same interface as the report's CNN.

timm (and so torchvision) is imported only when one of these is built, so training the report's
CNN needs neither.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from torch import nn

from pneumoscan.errors import PneumoscanError
from pneumoscan.models.registry import register_model

# The backbones users of this field ask for first, and the quick recipe's small ResNet-10-T; any
# other timm name works too.
STANDARD_BACKBONES = (
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "convnext_nano",
    "resnet10t",
)


def is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    from timm.models import split_model_name_tag

    # Exact registry names, not list_models' patterns ("resnet1*" is not a model); a pretrained
    # tag (``resnet18.a1_in1k``) must be one timm knows for that architecture.
    name = name.removeprefix("timm:")
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        return False
    return not tag or name in timm.list_pretrained(f"{arch}.*")


def create_timm_model(
    name: str,
    *,
    in_chans: int = 1,
    num_classes: int = 2,
    pretrained: str | bool = False,
    drop_rate: float = 0.0,
    **_,
) -> nn.Module:
    """A timm model with ``in_chans`` inputs and ``num_classes`` logits.

    ``pretrained`` is False, True (timm's published weights, which needs the network) or a path to
    a local weights file. timm folds RGB first-layer weights into ``in_chans`` channels itself.
    """
    try:
        import timm
    except ImportError as e:
        raise PneumoscanError("timm is not installed: pip install timm torchvision") from e
    arch = name.removeprefix("timm:")
    kwargs = {"in_chans": in_chans, "num_classes": num_classes, "drop_rate": drop_rate}
    if isinstance(pretrained, (str, Path)) and pretrained not in ("", "timm"):
        path = Path(pretrained)
        if not path.is_file():
            raise PneumoscanError(f"{path}: pretrained weights file not found")
        file_keys = _weight_names(path)
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        with _timm_warnings() as said:
            model = _create_offline_aware(timm, arch, kwargs)
    except PneumoscanError:
        raise
    except Exception as e:  # unreadable or mismatched weight files raise many types
        if not kwargs.get("pretrained"):
            raise
        source = kwargs.get("pretrained_cfg_overlay", {}).get("file")
        where = f"{source}: " if source else ""
        raise PneumoscanError(
            f"{where}cannot load pretrained weights for {arch!r}: {_load_reason(e)}") from None
    if "pretrained_cfg_overlay" in kwargs:
        _check_fits(model, file_keys, kwargs["pretrained_cfg_overlay"]["file"], arch)
    for message in said:  # the weights fit: what timm noted on the way is worth a line
        print(f"warning: timm: {_shortened(message)}", file=sys.stderr)
    model.gradcam_layer = model.feature_info[-1]["module"]
    return model


def _weight_names(path: Path) -> set[str]:
    """The tensor names in a weights file, read as timm reads it (tensors only, no code)."""
    from timm.models import load_state_dict

    try:
        return set(load_state_dict(str(path)))
    except Exception as e:  # junk, a pickle of other objects, a truncated file: many types
        raise PneumoscanError(f"{path}: not a weights file timm can read "
                              f"({type(e).__name__})") from None


def _check_fits(model: nn.Module, file_keys: set[str], path: str, arch: str) -> None:
    """Refuse a file that leaves any of the network's weights (its classifier aside) unloaded.

    timm loads a file leniently when the classifier is replaced (2 classes here, not 1,000), so
    a file of another network, or with prefixed names, loaded nothing and trained from scratch.
    """
    head = model.pretrained_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    wanted = [name for name, _ in model.named_parameters()
              if not any(name == h or name.startswith(h + ".") for h in heads)]
    missing = [name for name in wanted if name not in file_keys]
    if missing:
        raise PneumoscanError(
            f"{path}: does not fit {arch!r}: {len(missing)} of its {len(wanted)} weight tensors "
            f"are not in the file (first: {missing[0]})")


def _create_offline_aware(timm, arch: str, kwargs: dict) -> nn.Module:
    if not kwargs.get("pretrained") or "pretrained_cfg_overlay" in kwargs:
        return timm.create_model(arch, **kwargs)
    require_published_weights(arch)
    try:
        return timm.create_model(arch, **kwargs)
    except Exception as e:  # hub and HTTP errors come in many types
        raise PneumoscanError(
            f"cannot download pretrained {arch} weights ({type(e).__name__}); "
            "pass --pretrained PATH with a local weights file"
        ) from e


# The files timm looks for in a Hugging Face repository of weights, in its order.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def require_published_weights(name: str) -> None:
    """Raise a one-line PneumoscanError unless timm's published weights for ``name`` can be had:
    already in the Hugging Face cache (``HF_HOME``; torch.hub's for the few published by URL),
    or from their host, checked at once rather than after a long time-out. The message names
    the file to fetch by other means."""
    from urllib.parse import urlsplit

    from pneumoscan.net import require_network

    hub_id, url = _weights_source(name)
    if hub_id:
        if _in_hub_cache(hub_id):
            return  # timm reads it from the cache, offline too
        host, where = "huggingface.co", f"{HUB_WEIGHT_FILES[0]} of huggingface.co/{hub_id}"
    elif url:  # a few older families are published elsewhere, and cached by torch.hub
        import torch.hub

        file = Path(urlsplit(url).path).name
        if (Path(torch.hub.get_dir()) / "checkpoints" / file).is_file():
            return
        host, where = urlsplit(url).hostname or "huggingface.co", url
    else:
        host, where = "huggingface.co", ""
    copy = f"a local copy ({where})" if where else "a local weights file"
    require_network(host, what=f"pretrained {name} weights",
                    instead=f"--pretrained PATH with {copy}")


def _weights_source(name: str) -> tuple[str | None, str | None]:
    """Where timm takes ``name``'s published weights from: its Hugging Face repository
    ('timm/resnet18.a1_in1k'), else a URL; (None, None) when it names none."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name.removeprefix("timm:"))
    except Exception:  # a name timm has no weights for: the download fails and says so
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "url", None) or None


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in HUB_WEIGHT_FILES)


def _standard(arch: str):
    def factory(in_chans: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
        return create_timm_model(arch, in_chans=in_chans, num_classes=num_classes, **kwargs)

    factory.__name__ = arch
    factory.__doc__ = f"timm {arch}"
    return factory


for _arch in STANDARD_BACKBONES:
    register_model(_standard(_arch))


@contextlib.contextmanager
def _timm_warnings():
    """timm's warnings while it builds a model, kept rather than logged: loading a file of
    another network, it lists every key it did not expect, kilobytes on one line, before the
    one-line refusal that says the same."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    timm_log = logging.getLogger("timm")
    keep, propagated = Keep(logging.WARNING), timm_log.propagate
    timm_log.addHandler(keep)
    timm_log.propagate = False
    try:
        yield said
    finally:
        timm_log.removeHandler(keep)
        timm_log.propagate = propagated


def _shortened(message: str, limit: int = 200) -> str:
    line = " ".join(message.split())
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


def _load_reason(e: Exception) -> str:
    """One line on why weights did not load. torch's state-dict errors open with a header line
    ("Error(s) in loading state_dict for ResNet:") and give the reason below it: the first
    missing or unexpected key, or the first shape that does not fit, is the telling part."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        return f"the file does not fit this network ({_shortened(lines[1])})"
    if isinstance(e, KeyError):  # a model's own loader looked for a tensor by name
        return f"the file has no tensor {lines[0]} that its loader needs (another network's?)"
    return lines[0]
