"""Count the operations that make the host wait for the device, with their Python call sites (issue 21).

`SyncCounter` is a context manager that stacks two PyTorch modes:

- a `TorchDispatchMode` that sees every aten op and counts those that need a device value on the host:
  ``aten._local_scalar_dense`` (what ``.item()``, ``float(t)``, ``bool(t)`` and ``if t:`` call), ops whose output
  shape depends on the data (``nonzero``, ``masked_select``, boolean indexing, ``unique``, ``repeat_interleave``
  without ``output_size``, ``bincount``, ``equal``) and copies from a device to the host (``_to_copy``/``copy_``
  whose output is on the CPU and input is not – these show only on a GPU, a CPU tensor's ``.cpu()`` is no op);
- a `TorchFunctionMode` that counts the Python-level host reads which on a CPU tensor never reach aten:
  ``Tensor.tolist``, ``Tensor.numpy``, ``Tensor.cpu`` and ``Tensor.to("cpu")`` (the literal string: ``.to(x.device)``
  is left alone, on a CPU run it cannot be told from a copy to the host) – on a device tensor each is a copy to the
  host, so a CPU run reports them as "would sync on a device".

Each event is recorded with its op and the innermost call site outside torch (file:line in function), so a
failing count says where the read is. The counter is switched on and off with `on()`/`off()` (or the phase
name given to `phase(...)`), which lets a training-loop callback count only the steps it means to.
Used by tests/test_gpu_paths.py (on CPU) and benchmarks/gpu_check.py (on the GPU).
"""
from __future__ import annotations

import os
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops that always read a device value on the host (or whose output size depends on device data)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
            aten.bincount.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.unique_dim_consecutive.default, aten._unique.default}
for _name in ("nonzero.out", "masked_select.out", "_local_scalar_dense.out"):
    try: SYNC_OPS.add(getattr(aten, _name.split(".")[0]).out)
    except AttributeError: pass

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)
_HOST_METHODS = {"tolist", "numpy", "cpu"}


def _is_cpu_device(d) -> bool:
    return d is not None and torch.device(d).type == "cpu"


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


def dispatch_sync_reason(func, args, kwargs, out) -> str | None:
    "Why this aten call makes the host wait for the device (None if it does not)."
    if func in SYNC_OPS: return str(func.overloadpacket.__name__)
    name = func.overloadpacket.__name__
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and _bool_index(args[1]):
        return f"{name} with a boolean mask"
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and (kwargs or {}).get("output_size") is None \
            and not (len(args) > 3 and args[3] is not None):
        return "repeat_interleave without output_size"
    if name in ("_to_copy", "copy_"):                          # a copy from a device to the host
        src = args[1] if name == "copy_" else args[0]
        dst = out if isinstance(out, torch.Tensor) else args[0]
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type not in ("cpu", "meta") \
                and dst.device.type == "cpu":
            return f"{name} to the host"
    return None


def call_site(stack=None) -> str:
    "The innermost frame that is neither torch's nor this file's, as 'path:line in function'."
    stack = stack or traceback.extract_stack()
    for fr in reversed(stack):
        f = os.path.abspath(fr.filename)
        if f == _HERE or f.startswith(_TORCH_DIR) or "/torch/" in f or f.startswith("<"): continue
        return f"{os.path.relpath(f) if not os.path.relpath(f).startswith('..') else f}:{fr.lineno} in {fr.name}"
    return "<unknown>"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter): super().__init__(); self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        c = self.counter
        if c.active and not c._inside:
            why = dispatch_sync_reason(func, args, kwargs, out)
            if why: c._record(why)
        return out


class _Function(TorchFunctionMode):
    def __init__(self, counter): super().__init__(); self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        name = getattr(func, "__name__", "")
        host = False
        if c.active and not c._inside and args and isinstance(args[0], torch.Tensor):
            if name in _HOST_METHODS: host = True
            elif name == "to":                                     # .to("cpu") or .to(device="cpu"), the literal string
                dev = kwargs.get("device", args[1] if len(args) > 1 else None)
                host = isinstance(dev, str) and _is_cpu_device(dev)
        if not host: return func(*args, **kwargs)
        where = "cpu" if args[0].device.type == "cpu" else args[0].device.type
        c._record(f"Tensor.{name}"
                  + (" (a CPU tensor here: would sync on a device)" if where == "cpu" else " to the host"))
        c._inside += 1                                             # the aten ops it runs are this one read
        try: return func(*args, **kwargs)
        finally: c._inside -= 1


class SyncCounter:
    "Context manager counting host-device syncs by phase; `events` = [(phase, reason, call site)]."
    def __init__(self, active: bool = True):
        self.events, self.phase_name, self._inside = [], "all" if active else None, 0
        self._modes = []

    @property
    def active(self) -> bool: return self.phase_name is not None

    def phase(self, name: str | None):
        "Count the following events under `name` (None: stop counting)."
        self.phase_name = name

    def on(self, name: str = "all"): self.phase(name)
    def off(self): self.phase(None)

    def _record(self, reason: str):
        self.events.append((self.phase_name, reason, call_site()))

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes: m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes): m.__exit__(*exc)
        self._modes = []
        return False

    def count(self, phase: str | None = None) -> int:
        return sum(1 for p, _, _ in self.events if phase is None or p == phase)

    def sites(self, phase: str | None = None) -> Counter:
        "Counter of (reason, call site) of the events (of one phase)."
        return Counter((r, s) for p, r, s in self.events if phase is None or p == phase)

    def report(self, phase: str | None = None) -> str:
        lines = [f"{n:4d} x {r:45s} {s}" for (r, s), n in self.sites(phase).most_common()]
        return "\n".join(lines) or "(none)"


class SyncWindows:
    """Callbacks for `mopoe.learner.Learner` that switch a SyncCounter by phase: "step" from the last before_batch
    callback to the first after_backward one (the model's loss, zero_grad, backward); "callbacks" over the
    before_batch, after_backward and after_batch hooks of every other callback; off elsewhere (the optimizer's step
    with its host-side step counters, the data loading). The first `skip` steps are not counted (caches filled once
    per run). Pass `windows.callbacks` to `train(cfg, callbacks=...)`."""
    def __init__(self, counter: SyncCounter, skip: int = 1):
        from mopoe.learner import Callback
        self.counter, self.skip, self.first, self.steps_seen = counter, skip, None, 0
        win = self

        class Open(Callback):
            order = -10**9
            def before_batch(self, learn): win._set(learn, "callbacks")
            def after_backward(self, learn): win._set(learn, "callbacks")
            def after_batch(self, learn): win._set(learn, "callbacks")

        class Close(Callback):
            order = 10**9
            def before_batch(self, learn): win._set(learn, "step")
            def after_backward(self, learn): win.counter.off()
            def after_batch(self, learn): win.counter.off(); win.steps_seen = learn.step

        self.callbacks = [Open(), Close()]

    def _set(self, learn, phase):
        if self.first is None: self.first = learn.step
        self.counter.phase(phase if learn.step - self.first >= self.skip else None)   # learn.step: steps done before

    @property
    def counted_steps(self) -> int:
        return 0 if self.first is None else max(0, self.steps_seen - self.first - self.skip)
