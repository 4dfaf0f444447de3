"""CUDA graphs of the UNet calls a :class:`~latexblend.blend.blender.Blender` makes (``graphs``).

An eager UNet call launches thousands of small kernels, one after the other from the host: at SDXL sizes the
GPU waits for the host more than it computes, and a guidance pass (a forward and a backward, with its maps
written out) launches three times as many as a denoising step. A captured graph launches them all at once.

:class:`CallGraphs` replays one graph per *key*: everything about a call that the host decides (shapes,
which rows a span replaces, whether concept rows are active, whether logits are edited) is in the key, and
every value that changes between calls (the latent, the timestep, the prompt embedding, the rectification
strength) is an input tensor, copied into the graph's static input before each replay. What a call reads
besides its inputs must stay where it is (weights, bank rows, :class:`~latexblend.blend.steering.Steering`'s
persistent coefficient buffers). A key's first call runs eagerly (on a side stream: the warm-up capture
needs); its second is captured and replayed, and the first graph of each kind of call (denoising step,
guidance pass) is checked against an eager run of the same call; from then on a key is only replayed, in
this pipeline call and the next ones, with at most :data:`MAX_LIVE` graphs kept. Whatever goes wrong (the
capture, the check, too little free memory) leaves that key eager, with one line in
:attr:`CallGraphs.events`: a graph never changes what a call computes, only how fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

#: ``graphs`` settings: ``steering`` graphs the guidance passes and the rectified denoising steps, ``all``
#: every denoising step too; ``auto`` is ``steering`` on CUDA, ``off`` elsewhere.
GRAPHS = ("auto", "off", "steering", "all")
#: Capture only while this share of the device's memory is free (a graph keeps its memory).
MIN_FREE = 0.2
#: The check of a new graph against the eager call: relative distance of each output.
RTOL = 2e-2
#: Graphs kept at once (each holds its memory): the least recently used goes first (captured again if needed).
MAX_LIVE = 6


def resolve_graphs(setting: str, device: torch.device) -> str:
    """``setting`` for a pipeline on ``device``: ``off`` anywhere but CUDA, ``auto`` -> ``steering``."""
    if device.type != "cuda":
        return "off"
    return "steering" if setting == "auto" else setting


@dataclass
class Entry:
    """One key's graph: calls seen, the graph with its static inputs and outputs, or why it is not used."""

    seen: int = 0
    graph: object = None
    inputs: tuple = ()
    outputs: tuple = ()
    broken: str | None = None
    replays: int = 0
    used: int = 0


@dataclass
class CallGraphs:
    """Graphs of pure tensor functions, one per key (see the module doc). ``emulate`` (tests, any device):
    a "graph" is the function run again on its static inputs, so capture, check and replays run as on
    CUDA. ``events``: one line per graph captured or refused."""

    device: torch.device
    emulate: bool = False
    entries: dict = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=dict)  # per kind of call: whether its first graph matched eager
    clock: int = 0

    def run(self, key, fn: Callable[..., tuple], inputs: Sequence[torch.Tensor]) -> tuple:
        """``fn(*inputs)``, a tuple of tensors: eagerly, or replayed from the key's graph."""
        entry = self.entries.setdefault(key, Entry())
        self.clock += 1
        entry.used = self.clock
        if entry.broken is not None:
            return fn(*inputs)
        if entry.graph is not None:
            try:
                return self._replay(entry, inputs)
            except Exception as err:  # noqa: BLE001 - a replay that fails: this key runs eagerly from now on
                entry.graph, entry.inputs, entry.outputs = None, (), ()
                name = key[0] if isinstance(key, tuple) else key
                return self._refuse(entry, name, f"replay failed ({type(err).__name__}: {_first_line(err)})", fn,
                                    inputs)
        entry.seen += 1
        if entry.seen == 1:
            return self._warm_up(fn, inputs)
        return self._capture(entry, key, fn, inputs)

    def stats(self) -> dict:
        """Graphs in use, refused, and replays so far."""
        return {"graphs": sum(e.graph is not None for e in self.entries.values()),
                "refused": sum(e.broken is not None for e in self.entries.values()),
                "replays": sum(e.replays for e in self.entries.values())}

    def _warm_up(self, fn, inputs):
        if self.emulate:
            return fn(*inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _replay(self, entry: Entry, inputs) -> tuple:
        for static, value in zip(entry.inputs, inputs, strict=True):
            static.copy_(value)
        out = entry.graph()
        entry.replays += 1
        return tuple(t.clone() for t in (out if out is not None else entry.outputs))

    def _capture(self, entry: Entry, key, fn, inputs) -> tuple:
        """Capture the key's graph and replay it. The first graph of each kind of call (the key's first item)
        is checked against an eager run of the same call; the others of its kind are the same code with
        other shapes or spans, and are trusted once it matched (a kind whose check failed is not graphed)."""
        name = key[0] if isinstance(key, tuple) else key
        if self.checked.get(name) is False:
            return self._refuse(entry, name, "its kind differed from eager", fn, inputs)
        if not self.emulate:
            free, total = torch.cuda.mem_get_info(self.device)
            if free < MIN_FREE * total:
                return self._refuse(entry, name, f"{free / 2**30:.1f} GiB free of {total / 2**30:.0f}", fn, inputs)
        self._evict()
        try:
            entry.inputs = tuple(t.detach().clone() for t in inputs)
            if self.emulate:
                entry.graph = lambda: fn(*entry.inputs)
            else:
                torch.cuda.synchronize(self.device)
                graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
                try:
                    with torch.cuda.graph(graph):
                        entry.outputs = fn(*entry.inputs)
                finally:  # a capture that fails at its end leaves its side stream current
                    torch.cuda.set_stream(stream)
                entry.graph = graph.replay
            got = self._replay(entry, inputs)
            expected = None if self.checked.get(name) else fn(*inputs)
        except Exception as err:  # noqa: BLE001 - any failure means: this key stays eager
            entry.graph, entry.inputs, entry.outputs = None, (), ()
            return self._refuse(entry, name, f"capture failed ({type(err).__name__}: {_first_line(err)})", fn,
                                inputs)
        if expected is None:
            self._event(f"{name}: captured (its kind matched eager)")
            return got
        worst = max((_distance(a, b) for a, b in zip(got, expected, strict=True)), default=0.0)
        self.checked[name] = worst <= RTOL
        if worst > RTOL:
            entry.graph, entry.inputs, entry.outputs = None, (), ()
            entry.broken = f"differs from eager by {worst:.2e}"
            self._event(f"{name}: not used, the graph {entry.broken}")
            return expected
        self._event(f"{name}: captured, same outputs as eager (largest relative distance {worst:.1e})")
        return got

    def _evict(self) -> None:
        """Free the least recently used graph while :data:`MAX_LIVE` are kept (it is captured again if needed)."""
        live = [e for e in self.entries.values() if e.graph is not None]
        while len(live) >= MAX_LIVE:
            oldest = min(live, key=lambda e: e.used)
            oldest.graph, oldest.inputs, oldest.outputs, oldest.seen = None, (), (), 1
            live.remove(oldest)

    def _refuse(self, entry: Entry, name: str, why: str, fn, inputs) -> tuple:
        entry.broken = why
        self._event(f"{name}: not used, {why}")
        if not self.emulate:
            torch.cuda.synchronize(self.device)
        return fn(*inputs)

    def _event(self, line: str) -> None:
        self.events.append(f"cuda graph {line}")
        log.info("cuda graph %s", line)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` (0 for equal tensors; inf for non-finite values)."""
    a, b = a.detach().float(), b.detach().float()
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())
