"""HostSyncCounter: counts host synchronisations and dispatched ops, to assert code is sync-free.

A GPU runs ahead of the Python thread that queues its work until the host needs a value the GPU
computes: then the host waits for every queued kernel (a "host synchronisation") and the GPU idles
while Python queues the next ones. A training step should have none. HostSyncCounter finds them on
the CPU, where the tests run, by counting the operations that force one on a GPU:

    from helpers import HostSyncCounter    # tests/ is on sys.path under pytest
    with HostSyncCounter() as sync:
        train_step(...)                    # eager mode (not under torch.compile)
    assert sync.count == 0, sync.report()  # the report names each sync and the line that made it
    print(sync.total_ops)                  # aten ops dispatched: a proxy for launch overhead

Counted as a synchronisation (each occurrence counts 1):
- a tensor's value read on the host: `.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`,
  `f"{t:.2f}"` (aten._local_scalar_dense), and ops that return a Python bool (torch.equal,
  torch.allclose, is_nonzero);
- ops whose output shape depends on the data (the host reads it to allocate the output):
  `nonzero` (also `torch.where(cond)`, `argwhere`), `masked_select`, boolean-mask indexing and
  assignment (`x[mask]`, `x[mask] = v`: index / index_put with a bool or uint8 index), `unique`
  (all forms), `bincount`, `repeat_interleave` with tensor repeats and no `output_size`, and linalg
  error checks (`_linalg_check_errors`, e.g. torch.linalg.cholesky without `_ex`);
- copies between host and device: `.tolist()`, `.numpy()`, `.cpu()`, `print(t)` (counted on a CPU
  tensor too, where they copy nothing, because the same code copies on a GPU), and
  `torch.tensor(data, device=...)` / `torch.as_tensor(data, device=...)` (Python data, copied to
  the device with a blocking copy); on a GPU also every blocking (`non_blocking=False`) copy
  between CPU and GPU memory, e.g. `x.to("cuda")` of a CPU tensor. On the CPU `x.to(device)` is
  not counted: there it cannot tell a host-device copy from a no-op.
Not counted, because they do not synchronise: `torch.where(c, a, b)`, `masked_fill`, `index_select`,
`gather`, `sort`, `randperm`, `nonzero_static`, shapes (`x.shape[0]`), random draws on the device.
The list covers the common cases, not every kernel (some cuSOLVER linalg ops synchronise inside):
on a GPU, `torch.cuda.set_sync_debug_mode("warn")` is the authoritative check.

`total_ops` counts each aten op that reaches the dispatcher once, forward and backward alike (an
op's own internal calls are not counted; a `torch._foreach_*` call counts 1): it measures Python and
dispatch work, not FLOPs.
"""
import collections
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops that read a tensor's value on the host, or whose output shape depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "value read on the host (.item(), int(t), bool(t), ...)",
    aten.equal.default: "torch.equal returns a Python bool",
    aten.allclose.default: "torch.allclose returns a Python bool",
    aten.is_nonzero.default: "is_nonzero returns a Python bool",
    aten.nonzero.default: "nonzero: output shape depends on the data",
    aten.masked_select.default: "masked_select: output shape depends on the data",
    aten.bincount.default: "bincount: output length depends on the data",
    aten._unique.default: "unique: output shape depends on the data",
    aten._unique2.default: "unique: output shape depends on the data",
    aten.unique_dim.default: "unique: output shape depends on the data",
    aten.unique_consecutive.default: "unique_consecutive: output shape depends on the data",
    aten.unique_dim_consecutive.default: "unique_consecutive: output shape depends on the data",
    aten._linalg_check_errors.default: "linalg error check reads the info tensor on the host",
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# Tensor methods and torch functions that copy to or from the host (counted in __torch_function__).
HOST_METHODS = {torch.Tensor.tolist: "tolist() copies to the host",
                torch.Tensor.numpy: "numpy() copies to the host",
                torch.Tensor.cpu: "cpu() copies to the host",
                torch.Tensor.__array__: "__array__ copies to the host",
                torch.Tensor.__repr__: "printing a tensor copies it to the host"}
HOST_DATA = {torch.tensor: "torch.tensor(data, device=...) copies host data to the device",
             torch.as_tensor: "torch.as_tensor(data, device=...) copies host data to the device"}
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _sync_reason(func, args, kwargs):
    """Why this aten call synchronises on a GPU, or None."""
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{func}: boolean-mask indexing (output shape depends on the data)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size"
    if func in COPIES:  # _to_copy(src, device=..., non_blocking=...), copy_(dst, src, non_blocking)
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device") or args[0].device
        else:
            src, dst = args[1], args[0].device
        blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
        kinds = {src.device.type, torch.device(dst).type}
        if blocking and "cpu" in kinds and len(kinds) == 2 and "meta" not in kinds:
            return f"{func}: blocking copy between host and device"
    return None


def _caller():
    """The innermost stack frame outside torch and this file, as 'path:line in function'."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counter.ops[str(func)] += 1
        if not self.counter._in_host_copy:
            reason = _sync_reason(func, args, kwargs)
            if reason:
                self.counter._record(reason)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = HOST_METHODS.get(func)
        if reason is None and func in HOST_DATA and kwargs.get("device") is not None:
            reason = HOST_DATA[func]
        if reason is None or self.counter._in_host_copy:
            return func(*args, **kwargs)
        self.counter._record(reason)
        self.counter._in_host_copy = True  # its own copy (on a GPU) is this same sync
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._in_host_copy = False


class HostSyncCounter:
    """Context manager: counts the host synchronisations (see the module docstring) and the aten
    ops dispatched inside it, on any device. Attributes, after or during the block:
      count      number of host synchronisations;
      syncs      list of (reason, 'file:line in function'), the innermost caller outside torch;
      ops        collections.Counter of dispatched aten ops by name ('aten.add.Tensor': 3, ...);
      total_ops  sum of ops.
    A counter may be entered again: each `with` block adds to the same totals."""

    def __init__(self):
        self.ops = collections.Counter()
        self.syncs = []
        self._in_host_copy = False
        self._modes = []

    @property
    def count(self):
        return len(self.syncs)

    @property
    def total_ops(self):
        return sum(self.ops.values())

    def _record(self, reason):
        self.syncs.append((reason, _caller()))

    def report(self):
        """One line per synchronisation (for assertion messages)."""
        lines = [f"{len(self.syncs)} host synchronisation(s), {self.total_ops} ops"]
        return "\n".join(lines + [f"  {where}: {reason}" for reason, where in self.syncs])

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
        return False
