"""What the benchmarks count besides time: operators dispatched (:class:`OpCounter`) and activations kept for
backward (:class:`SavedBytes`). Both are free of timing noise, so the CPU measures them as a GPU would."""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Inside ``with OpCounter() as ops``: ``ops.count``, the aten ops dispatched (on a GPU, about the kernels
    launched), and ``ops.reads``, each scalar read (``aten::_local_scalar_dense``: ``.item()``, ``float()``,
    ``.tolist()``; a device sync when the tensor is on a GPU) counted by the latexblend or torch.optim
    function that asked for it and the tensor's device type."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.reads: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename != __file__
                      and ("latexblend" in f.filename or "optim" in f.filename)]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "other"
            self.reads[f"{where} ({args[0].device.type})"] += 1
        return func(*args, **(kwargs or {}))


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """While active, the largest number of bytes of activations autograd keeps for backward (weights
    excluded) in one UNet pass that runs with grad: the guidance passes (the main passes run without)."""

    def __init__(self, unet):
        params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        self.nbytes, self._pass, self._seen = 0, 0, set()
        self._hook = unet.register_forward_pre_hook(self._new_pass)

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in self._seen:
                self._seen.add(ptr)
                self._pass += t.untyped_storage().nbytes()
                self.nbytes = max(self.nbytes, self._pass)
            # detach: a node that saves its own output would otherwise hold a tensor pointing back at
            # the node (grad_fn), a cycle through C++ that Python's GC never frees (leaked every pass)
            return t.detach()

        super().__init__(pack, lambda t: t)

    def _new_pass(self, module, args):
        if torch.is_grad_enabled():
            self._pass, self._seen = 0, set()

    def __enter__(self) -> SavedBytes:
        super().__enter__()
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return super().__exit__(*exc)
