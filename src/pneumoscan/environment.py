"""What a run was made with: the software and the machine, saved in its ``config.json``.

Figures move with library versions and devices (a GPU's random streams differ from a CPU's,
cuDNN picks its own algorithms), so a run says where it came from, and the report shows it.
"""

from __future__ import annotations

import platform
from importlib import metadata

from pneumoscan import __version__

# Distributions whose versions change what a run computes or how it reads images.
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pydicom", "scikit-learn")


def run_config(fields: dict, device_type: str | None = None, processes: int = 1) -> dict:
    """The contents of a run's config.json: the version, ``fields``, then the environment."""
    return {"pneumoscan": __version__, **fields,
            "environment": describe_environment(device_type, processes)}


def describe_environment(device_type: str | None = None, processes: int = 1) -> dict:
    """Python, the platform, the installed versions of ``PACKAGES`` and, given the device type
    a run trained on, that device (and the number of torchrun processes)."""
    env: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional (pydicom, timm for seed_cnn runs): not installed here
    if device_type is not None:
        env["device"] = _device_name(device_type)
        env["processes"] = processes
    return env


def _device_name(device_type: str) -> str:
    import torch

    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return f"{name} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    threads = torch.get_num_threads()
    return f"{_cpu_model()}, {threads} thread{'' if threads == 1 else 's'}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
