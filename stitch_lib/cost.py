"""What a model costs to run and to ship: params, FLOPs, activation memory, latency, bytes.
Per segment too (`segment_costs`): FLOPs, latency and the operator kind, which lets a planner
learn how fast a device runs each kind of operator and predict a model it has not run yet.

Figures are measured on this machine at batch 1 on the CPU. FLOPs come from
`torch.utils.flop_counter` with timm's fused attention switched off while counting (the
counter does not see fused attention on the CPU); like the counter, they leave out norms,
activations and pooling. Peak activation memory is the largest input + output of any leaf
module, fp32: a lower bound on what the model needs besides its weights.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextmanager
def _unfused_attention(model: nn.Module):
    mods = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True


@torch.no_grad()
def flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on `x` (2 per multiply-add)."""
    with _unfused_attention(model), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Largest (input + output) bytes of any leaf module for one forward pass on `x`."""
    peak = 0

    def hook(_m, inputs, output):
        nonlocal peak
        peak = max(peak, _nbytes(inputs) + _nbytes(output))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return peak


@torch.no_grad()
def _median_ms(calls: Sequence[Callable[[], object]], rounds: int, warmup: int,
               threads: int) -> list[float]:
    """Median time of each call in ms, measured interleaved round by round so that machine
    noise falls on all alike; runs on `threads` CPU threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in calls]
    try:
        for r in range(warmup + rounds):
            for k, call in enumerate(calls):
                t0 = time.perf_counter()
                call()
                if r >= warmup:
                    times[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(prev)
    return [statistics.median(t) for t in times]


def latencies_ms(models: Mapping[str, nn.Module], x: torch.Tensor, rounds: int = 30,
                 warmup: int = 3, threads: int = 1) -> dict[str, float]:
    """Median batch-1 latency of each model in ms (see `_median_ms`)."""
    ms = _median_ms([lambda m=m: m(x) for m in models.values()], rounds, warmup, threads)
    return dict(zip(models, ms))


def op_kind(module: nn.Module) -> str:
    """The operator type that sets a module's speed on a device: "attention" (holds an
    attention module), "dwconv" (a grouped / depthwise convolution), "conv", "mlp" (linear
    layers only) or "other"."""
    mods = list(module.modules())
    if any(type(m).__name__.endswith("Attention") for m in mods):
        return "attention"
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    if any(m.groups > 1 for m in convs):
        return "dwconv"
    if convs:
        return "conv"
    return "mlp" if any(isinstance(m, nn.Linear) for m in mods) else "other"


@torch.no_grad()
def segment_costs(parts: Sequence[tuple[str, nn.Module]], x: torch.Tensor, rounds: int = 30,
                  warmup: int = 3, threads: int = 1) -> list[dict]:
    """Cost of each of `parts` (ID, module), run in order from the batch-1 input `x`:
    {"segment_id", "flops", "latency_ms" (median, interleaved rounds on `threads` threads,
    each part on its own input), "kind" (`op_kind`)}."""
    inputs = []
    for _, m in parts:
        inputs.append(x)
        x = m(x)
    ms = _median_ms([lambda m=m, inp=inp: m(inp) for (_, m), inp in zip(parts, inputs)],
                    rounds, warmup, threads)
    return [{"segment_id": sid, "flops": flops(m, inp), "latency_ms": t, "kind": op_kind(m)}
            for (sid, m), inp, t in zip(parts, inputs, ms)]


def catalog_segment_costs(anchors: Mapping[str, Sequence], hybrids: Sequence, x: torch.Tensor,
                          rounds: int = 30) -> dict[str, list[dict]]:
    """Per-segment costs of every anchor (name → its segments) and hybrid (a
    stitch_lib.stitch.Hybrid, by name): a hybrid runs its front anchor's first i+1 segments,
    its stitch (ID "stitch", measured on the front's activation) and its back anchor's
    segments after j, each costing what it costs in its anchor."""
    out = {name: segment_costs([(s.segment_id(), s) for s in segs], x, rounds)
           for name, segs in anchors.items()}
    for h in hybrids:
        stitch = segment_costs([("front", h.front), ("stitch", h.stitch)], x, rounds)[1]
        out[h.name] = [*out[h.front_name][: h.i + 1], stitch, *out[h.back_name][h.j + 1:]]
    return out


def machine(threads: int = 1) -> dict:
    """The machine costs are measured on: platform, CPU model, cores, timing threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's answer stands
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__}


def fp16_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Tensors as an fp16 safetensors blob (the shipping form of weights)."""
    return st_save({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()})


def compressed_size(blob: bytes) -> int:
    """Size of `blob` after zlib level 9, the way deltas are shipped."""
    return len(zlib.compress(blob, 9))


def model_fp16_bytes(model: nn.Module) -> int:
    """Bytes of all of a model's parameters and buffers in fp16 (uncompressed)."""
    seen = {id(t): t for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point()}
    return sum(t.numel() * 2 for t in seen.values())
