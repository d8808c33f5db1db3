"""Launching a Triton kernel with less host time: Triton's own path once per specialisation, then the compiled
kernel directly.

`kernel[grid](*args, **constexprs)` binds every argument, specialises each one (dtype and 16-byte alignment of
a tensor, 1 / multiple of 16 / 32-bit range of an int), builds a string key from all of them and looks it up: for
grouped_gemm's ~60 arguments about half of a launch's 150-300 us of host time on an H200's host (run 48c), and at
4K tokens the experts' block is host-bound (run 31). Every layer repeats the same launches, so `DirectLauncher`
keys each call by a tuple that determines Triton's specialisation (the int arguments by value, tensors by dtype
and alignment, descriptors by dtype and box, the constexprs with their types, the launch options, and the settings
Triton adds at every call) and, on a repeat, hands
the arguments in Triton's order straight to the compiled kernel's launcher, as Triton itself does after its
lookup. The first call of each key goes through Triton (compiling if needed) and records the compiled kernel.
Call sites use `launch(kernel, grid, *args, **constexprs)`, which finds the kernel's launcher (the kernel is looked
up where it is called, so a test may replace it with a stand-in, which is then called as Triton's kernel would be).

Falls back to Triton's path wherever this cannot be sure to launch what Triton would: the interpreter, a Triton
whose launch interface was not checked (TESTED_TRITON), a launch hook set (profilers) or a custom pass pipeline,
an argument of a type it does not key, a call of another form than the call sites' (see DirectLauncher), or
MOETUNE_DIRECT_LAUNCH=0. Run 49 (H200): 35-60 us less host time per launch, bitwise the same results.

Every launch, either way, runs on the GPU of its first tensor argument: Triton launches on the current GPU and its
stream, and a model split over GPUs by a device_map (or loaded whole on cuda:1 while cuda:0 is current) would
otherwise run its kernels on the wrong one. Where that GPU is not the current one, the launch makes it current for
its duration (0.26 us a launch to check, run 65e).
"""

from __future__ import annotations

import inspect
import os

import torch

try:
    import triton
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - the backends' probe reports a missing triton
    triton = None
    JITFunction = ()

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton before 3.4
    TensorDescriptor = None

# Triton releases whose JITFunction.run ends in the call that DirectLauncher repeats:
# compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, launch_metadata,
#              launch_enter_hook, launch_exit_hook, *bound_args.values())  (read in 3.6, 3.7, 3.8 and 3.9)
TESTED_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))

# A key per distinct set of int arguments (strides, sizes, tile counts): bounded for runs whose batch lengths vary.
MAX_ENTRIES = 4096


def _supported() -> bool:
    if triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    release = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return release in TESTED_TRITON and hasattr(triton, "knobs")


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's: Triton's path then passes it each launch's metadata), or a custom
    pass pipeline (Triton 3.8+ adds it to its own key)."""
    runtime = triton.knobs.runtime
    # Triton 3.6 keeps each hook as a chain of calls (HookChain), empty unless something was added.
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook)) \
        or getattr(runtime, "add_stages_inspection_hook", None) is not None


def _settings() -> tuple:
    """The process-wide settings Triton adds to a kernel's options at every call (device asserts, sanitizers)."""
    return (triton.knobs.runtime.debug, triton.knobs.compilation.instrumentation_mode,
            getattr(triton.knobs.compilation, "fpsan_homomorphic_casts", False))


def _arg_key(arg):
    """What Triton specialises an argument on (or more), hashable; NotImplemented for a type not handled here.
    (Plain ints, keyed by value, and plain tensors are keyed inline in DirectLauncher.__call__.)"""
    kind = type(arg)
    if kind is float:
        return float  # passed as fp32, never specialised
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if kind is bool:
        return bool, arg  # not 1 / 0: True == 1 in a tuple comparison
    if TensorDescriptor is not None and kind is TensorDescriptor:
        # Triton keys a host descriptor by dtype and box; its base, shape and strides are encoded at each launch.
        return TensorDescriptor, arg.base.dtype, tuple(arg.block_shape)
    return NotImplemented


def _gpu_of(args) -> int:
    """The GPU index of the first tensor among a launch's arguments (a descriptor's base counts), -1 for none or a
    CPU tensor (the interpreter)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.get_device()
        if TensorDescriptor is not None and type(arg) is TensorDescriptor:
            return arg.base.get_device()
    return -1


class DirectLauncher:
    """`launcher(grid, *args, **constexprs)` launches `kernel` as `kernel[grid](*args, **constexprs)` does.

    args: every runtime argument, positionally, in the kernel's order; constexprs and launch options (num_warps,
    num_stages) by keyword, always the same names for one call site (their order is part of the key). Calls of
    another form (a constexpr passed positionally, a runtime argument by keyword, a callable grid) take Triton's
    path."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = list(inspect.signature(kernel.fn).parameters.values()) if isinstance(kernel, JITFunction) else []
        self._params = params
        # Triton's binder also takes *args and keyword-only parameters, in an order _tail does not rebuild.
        plain = all(param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for param in params)
        constexpr = list(getattr(kernel, "constexprs", []))  # Triton's own reading of the annotations
        self._first_constexpr = constexpr[0] if constexpr else len(params)
        self._runtime_names = {param.name for param in params[:self._first_constexpr]}
        self._compiled: dict[tuple, tuple] = {}
        # The constexprs must be the trailing parameters: a runtime one after them would come by keyword, unkeyed.
        self._direct = isinstance(kernel, JITFunction) and plain and _supported() \
            and constexpr == list(range(self._first_constexpr, len(params)))
        self.direct_launches = 0  # how many went straight to a compiled kernel (tests, diagnostics)

    def __call__(self, grid: tuple, *args, **constexprs):
        # Triton launches on the current GPU and its stream: make it the operands' (a model split over GPUs by a
        # device_map, or one on cuda:1 with cuda:0 current), for this launch only.
        first = args[0] if args else None
        gpu = first.get_device() if type(first) is torch.Tensor else _gpu_of(args)  # (the common case inline)
        current = torch.cuda.current_device() if gpu >= 0 else -1
        if gpu != current:
            with torch.cuda.device(gpu):
                return self(grid, *args, **constexprs)
        if (not self._direct or os.environ.get("MOETUNE_DIRECT_LAUNCH") == "0" or _hooked() or callable(grid)
                or len(args) > self._first_constexpr or self.kernel.pre_run_hooks):
            return self.kernel[grid](*args, **constexprs)
        # ints and plain tensors inline (most of the ~60 arguments): this runs at every launch
        arg_keys = tuple([arg if type(arg) is int else (arg.dtype, arg.data_ptr() % 16 == 0)
                          if type(arg) is torch.Tensor else _arg_key(arg) for arg in args])
        if NotImplemented in arg_keys:
            return self.kernel[grid](*args, **constexprs)
        driver = triton.runtime.driver.active
        device = current if current >= 0 else driver.get_current_device()  # (Triton's is torch's current device)
        # Triton keys a constexpr by str(value) (True, 1 and 1.0 are three kernels), and reads these settings at
        # every call.
        key = (device, arg_keys, tuple([(name, type(value), value) for name, value in constexprs.items()]),
               _settings())
        try:
            entry = self._compiled.get(key)
        except TypeError:  # an unhashable keyword value (Triton's key is its str)
            return self.kernel[grid](*args, **constexprs)
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs)
            # None: Triton launched nothing (a jit_cache_hook's doing). A runtime argument by keyword: not keyed.
            if compiled is not None and not self._runtime_names.intersection(constexprs):
                if len(self._compiled) >= MAX_ENTRIES:
                    self._compiled.clear()
                self._compiled[key] = (compiled, self._tail(len(args), constexprs))
            return compiled
        compiled, tail = entry
        self.direct_launches += 1
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], grid_1, grid_2, driver.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)
        return compiled

    def _tail(self, positional: int, constexprs: dict) -> tuple:
        """The values of the parameters after the positional ones, in the kernel's order (as Triton binds them)."""
        tail = []
        for param in self._params[positional:]:
            if param.name in constexprs:
                tail.append(constexprs[param.name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:
                raise TypeError(f"{self.kernel.fn.__name__}: missing argument {param.name}")
        return tuple(tail)


_launchers: dict[int, tuple[object, DirectLauncher]] = {}


def launcher_of(kernel) -> DirectLauncher:
    """kernel's DirectLauncher (made on first use)."""
    held = _launchers.get(id(kernel))
    if held is None or held[0] is not kernel:
        held = _launchers[id(kernel)] = (kernel, DirectLauncher(kernel))
    return held[1]


def launch(kernel, grid: tuple, *args, **constexprs):
    """`kernel[grid](*args, **constexprs)` through kernel's DirectLauncher."""
    return launcher_of(kernel)(grid, *args, **constexprs)
