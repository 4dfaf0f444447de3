"""What we run on: the default device, its name, peak memory, the software versions, op and FLOP
counts, and the FLOP utilisation (MFU) of a measured rate against the device's datasheet peak. One place for what
``run.json`` and every benchmark report about the machine."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator

import accelerate
import diffusers
import torch
import torch.utils.checkpoint
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from latexblend import __version__
from latexblend.errors import LatexBlendError

#: Dense bf16 datasheet peak per device name (substring match), TFLOP/s, for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "RTX 4090": 165.2}


DEVICE_TYPES = ("cpu", "cuda", "mps")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine (``None``: CUDA when available, else the CPU). Every command
    taking ``--device`` goes through here: an unknown name or a device this machine lacks is one error."""
    if device is None or device == "auto":
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise LatexBlendError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LatexBlendError(f"device '{device}': this machine has no CUDA GPU that torch {torch.__version__} "
                                  f"can use; pass --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LatexBlendError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                                  f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LatexBlendError(f"device '{device}': MPS is not available on this machine; pass --device cpu")
    return str(parsed)


def resolve_mixed_precision(name: str) -> str:
    """Training's autocast mode: ``auto`` is bf16 on CUDA when supported, else fp16 on CUDA, else none;
    ``fp16`` needs a CUDA GPU (one clear error instead of accelerate's traceback)."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if name == "fp16" and not cuda:
        raise LatexBlendError("mixed precision fp16 needs a CUDA GPU and this machine has none; use auto, no or "
                              "bf16")
    return name


def device_name(device: str | torch.device) -> str:
    """``NVIDIA H100 80GB HBM3``, or the CPU's processor name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def peak_tflops(name: str, given: float | None = None) -> float | None:
    """``given`` if set, else the datasheet peak of the device called ``name`` (``None`` when unknown: CPUs)."""
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def mfu(tflop_per_step: float | None, steps_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved TFLOP/s over the peak (``None`` without a peak or a FLOP count)."""
    if not peak or not tflop_per_step:
        return None
    return tflop_per_step * steps_per_s / peak


def reset_peak_memory(device: str | torch.device) -> None:
    """Synchronise ``device`` and start a new CUDA allocator peak (nothing else on other devices)."""
    synchronize(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str | torch.device | None = None) -> int:
    """Peak bytes: the CUDA allocator's peak on a CUDA device, else the process's maximum resident set."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource  # POSIX only: imported where it is needed, the CUDA path above works without it

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str | torch.device) -> tuple[float, float]:
    """``(seconds, peak GiB)`` of one call, the device synchronised before and after; the peak is the CUDA
    allocator's during the call, 0 on other devices (a process's resident-set peak never goes down)."""
    reset_peak_memory(device)  # synchronises
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (peak_memory(device) / 2**30 if torch.device(device).type == "cuda" else 0.0)


def environment() -> dict:
    """Versions of Python and the libraries a result depends on, and torch's thread count."""

    return {"latexblend": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "threads": torch.get_num_threads()}


def _checkpoint(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def gradient_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing of a diffusers model on or off. As diffusers' own (non-reentrant), without
    stashing the random generators' states for the recomputation: our frozen models draw no random numbers
    (no dropout in eval mode), and reading the CUDA generator's state is refused inside a CUDA graph capture."""
    if on:
        model.enable_gradient_checkpointing(_checkpoint)
    else:
        model.disable_gradient_checkpointing()


# --------------------------------------------------------------------------- FLOP counting


def _cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU's fused attention kernels, which ``torch.utils.flop_counter`` leaves
    uncounted: the same counts as for the CUDA kernels (``QK^T`` and ``PV`` forward, four matmuls back)."""

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


class FlopCount:
    """What :func:`flop_counter` yields: ``tflop()`` after the counted block."""

    def __init__(self, mode):
        self.mode = mode

    def tflop(self) -> float:
        return self.mode.get_total_flops() / 1e12


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCount]:
    """Count the FLOPs of the block (``torch.utils.flop_counter``: matmuls, convolutions and attention,
    forward and backward, on any device). It changes no result: the counted work runs the same kernels."""

    mode = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with mode:
        yield FlopCount(mode)


def count_tflop(fn: Callable[[], object]) -> float:
    """TFLOP of one call of ``fn`` (:func:`flop_counter`)."""
    with flop_counter() as counter:
        fn()
    return counter.tflop()
