"""How training steps run: eagerly, or on CUDA as one CUDA graph of the whole step (``cuda_graph``).

A step's device work (:func:`~latexblend.train.step.update`: both text encoders, the splice, the UNet, the
loss, backward, clipping and AdamW) has static shapes and reads nothing back: every draw is made on the host
first (:func:`~latexblend.train.step.make_batch`, span positions and token ids included as tensors). So it
is captured once and replayed: thousands of kernel launches become one, and the GPU no longer waits for the
host. The run's first :data:`WARMUP` steps run eagerly (on a side stream, as capture requires); the next
step is captured, then checked: it runs once eagerly and once as the graph from the same state, and the
graph is kept only when both give the same losses (within bf16 tolerance) and the same update. Anything
that goes wrong (capture, check) is one log line, and the run continues eagerly from where it was: the
graph never changes what a run computes, only how fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from accelerate.utils import AutocastKwargs

from latexblend.train.setup import Setup
from latexblend.train.step import micro_batches, train_step, update

#: Eager steps before the capture: lazy initialisation (cuBLAS workspaces, the optimizer's state) done.
WARMUP = 2
#: The check: the graph's losses within this relative distance of the eager step's, its update within this
#: relative distance of the eager update (bf16: about 2^-8 per value, far more after the optimizer).
LOSS_RTOL, UPDATE_RTOL = 2e-2, 5e-2


def graph_blocker(setup: Setup, acc, optimizer, emulate: bool = False) -> str | None:
    """Why this run's steps cannot be one CUDA graph, or ``None`` (``emulate``: the CPU stand-in of tests)."""
    cfg = setup.cfg
    if cfg.cuda_graph == "off":
        return "cuda_graph is off"
    if emulate:
        return None
    if setup.device.type != "cuda":
        return f"the device is {setup.device.type}, not CUDA"
    if acc.num_processes > 1:
        return "gradients are averaged across processes"
    if acc.mixed_precision == "fp16":
        return "fp16 loss scaling reads the gradients back"
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    if cfg.use_8bit_adam or not all(g.get("capturable") for g in groups):
        return "the optimizer cannot be captured (8-bit AdamW, or made without capturable=True)"
    return None


class Emulated:
    """The CPU stand-in of a captured graph (tests): :meth:`replay` runs the captured function again on the
    same static batches, the gradients first unset as they were at the capture (a replay writes them anew)."""

    def __init__(self, fn: Callable[[], torch.Tensor], optimizer):
        self.fn, self.optimizer = fn, optimizer

    def replay(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.fn()


class Runner:
    """Runs the optimizer steps of one run (:meth:`step`); ``path`` says how they run (``eager`` or
    ``cuda graph``), ``note`` why, ``capture_s`` what the capture and its check took. ``log``: where the
    one line about the graph goes (the training log). ``emulate`` (tests, any device): the graph's steps
    with :class:`Emulated` instead of a CUDA graph: capture, check and replays as on CUDA."""

    def __init__(self, setup: Setup, optimizer, acc, params: list, log: Callable[[str], None] = print,
                 emulate: bool = False):
        self.setup, self.optimizer, self.acc, self.params, self.log = setup, optimizer, acc, params, log
        self.emulate = emulate
        blocker = graph_blocker(setup, acc, optimizer, emulate)
        self.pending = blocker is None  # a capture is still to be tried
        self.path, self.note, self.capture_s, self.check = "eager", blocker or "warming up", None, {}
        self.graph = self.static = self.out = None
        self.eager_steps = 0
        if blocker is not None and (setup.cfg.cuda_graph == "on" or setup.device.type == "cuda"):
            log(f"cuda graph: not used ({blocker}); training runs eagerly")

    def step(self, step: int) -> torch.Tensor:
        """Optimizer step ``step``; ``[loss, instance loss, prior loss]`` on the device (unread)."""
        if self.graph is not None:
            try:
                return self._replay(step)
            except Exception as err:  # noqa: BLE001 - the step runs eagerly, and every one after it
                self._drop(f"a replay failed ({type(err).__name__}: {_first_line(err)})")
        if self.pending and self.eager_steps >= WARMUP:
            self.pending = False
            losses = self._capture_and_check(step)
            if losses is not None:
                return losses
        self.eager_steps += 1
        return self._eager(step, side_stream=self.pending and not self.emulate)

    # ---- eager

    def _eager(self, step: int, side_stream: bool = False) -> torch.Tensor:
        if not side_stream:
            return train_step(self.setup, self.optimizer, self.acc, step, self.params)
        side = torch.cuda.Stream(self.setup.device)
        side.wait_stream(torch.cuda.current_stream(self.setup.device))
        with torch.cuda.stream(side):
            losses = train_step(self.setup, self.optimizer, self.acc, step, self.params)
        torch.cuda.current_stream(self.setup.device).wait_stream(side)
        return losses

    # ---- the graph

    def _capture(self, step: int) -> None:
        """Capture :func:`update` on static copies of step ``step``'s batches (nothing runs yet)."""
        # the graph sees only these tensors: the host-side fields are emptied, so nothing can depend on them
        self.static = [type(b)(**{**vars(b), **{k: t.clone() for k, t in b.tensors().items()}, "prompts": [],
                                  "replace": []}) for b in micro_batches(self.setup, self.acc, step)]
        self.optimizer.zero_grad(set_to_none=True)  # backward in the capture allocates them from the graph's pool

        def fn():
            return update(self.setup, self.optimizer, self.acc, self.static, self.params,
                          AutocastKwargs(cache_enabled=False))

        if self.emulate:
            self.graph = Emulated(fn, self.optimizer)
            return
        torch.cuda.synchronize(self.setup.device)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.setup.device)
        try:
            with torch.cuda.graph(graph):
                self.out = fn()
        finally:  # a capture that fails at its end leaves its side stream current
            torch.cuda.set_stream(stream)
        self.graph = graph

    def _replay(self, step: int) -> torch.Tensor:
        for static, batch in zip(self.static, micro_batches(self.setup, self.acc, step), strict=True):
            for key, tensor in static.tensors().items():
                tensor.copy_(getattr(batch, key), non_blocking=True)
        out = self.graph.replay()  # a CUDA graph refills self.out; the emulation returns the losses
        return (out if out is not None else self.out).clone()

    def _capture_and_check(self, step: int) -> torch.Tensor | None:
        """Capture, then check step ``step`` eagerly and as the graph from the same state. Returns the
        graph's losses (the step done), or ``None`` (the graph dropped, nothing changed: run it eagerly)."""
        start = time.perf_counter()
        try:
            self._capture(step)
            before = self._snapshot()
            self.optimizer.zero_grad(set_to_none=True)
            eager = self._eager(step)
            eager_params = [p.detach().to("cpu", copy=True) for p in self.params]
            self._restore(before)
            graph = self._replay(step)
            self.check = _compare(eager, graph, before["params"], eager_params, self.params)
        except Exception as err:  # noqa: BLE001 - any failure means: no graph, the run goes on eagerly
            self._drop(f"capture failed ({type(err).__name__}: {_first_line(err)})")
            if "before" in locals():
                self._restore(before)
            return None
        self.capture_s = time.perf_counter() - start
        if not self.check["same"]:
            self._restore(before)
            self._drop(f"its step differed from the eager step ({self.check['detail']})")
            return None
        self.path, self.note = "cuda graph", f"captured at step {step + 1} in {self.capture_s:.1f} s"
        self.log(f"cuda graph: {self.note}, same losses and update as eager ({self.check['detail']})")
        return graph

    def _drop(self, why: str) -> None:
        self.graph = self.static = self.out = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.setup.device.type == "cuda":
            torch.cuda.synchronize(self.setup.device)
            torch.cuda.empty_cache()
        self.path, self.note = "eager", f"cuda graph dropped: {why}"
        self.log(f"cuda graph: not used, {why}; training runs eagerly")

    def _snapshot(self) -> dict:
        """Host copies of the trainables and of every optimizer state tensor (restored in place)."""
        state = getattr(self.optimizer, "optimizer", self.optimizer).state
        return {"params": [p.detach().to("cpu", copy=True) for p in self.params],
                "state": {id(t): t.detach().to("cpu", copy=True) for s in state.values() for t in s.values()
                          if isinstance(t, torch.Tensor)}}

    def _restore(self, snapshot: dict) -> None:
        state = getattr(self.optimizer, "optimizer", self.optimizer).state
        with torch.no_grad():
            for p, saved in zip(self.params, snapshot["params"], strict=True):
                p.copy_(saved)
            for s in state.values():
                for t in s.values():
                    if isinstance(t, torch.Tensor) and id(t) in snapshot["state"]:
                        t.copy_(snapshot["state"][id(t)])
        self.optimizer.zero_grad(set_to_none=True)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


def _compare(eager: torch.Tensor, graph: torch.Tensor, before: list, after_eager: list, params: list) -> dict:
    """Whether the graph's step matches the eager step: losses, and each update ``after - before``."""
    a, b = eager.float().cpu(), graph.float().cpu()
    loss_ok = bool(torch.allclose(b, a, rtol=LOSS_RTOL, atol=1e-6))
    num = den = 0.0
    for p, p0, p1 in zip(params, before, after_eager, strict=True):
        num += float(torch.linalg.vector_norm(p.detach().cpu() - p1)) ** 2
        den += float(torch.linalg.vector_norm(p1 - p0)) ** 2
    rel = (num / den) ** 0.5 if den > 0 else 0.0
    return {"same": loss_ok and rel <= UPDATE_RTOL, "loss_eager": a.tolist(), "loss_graph": b.tolist(),
            "update_rel_diff": rel,
            "detail": f"loss {a[0]:.5f} eager, {b[0]:.5f} graph; update differs by {100 * rel:.2f}%"}
