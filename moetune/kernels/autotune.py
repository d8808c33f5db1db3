"""One-time autotuning of kernel block shapes per (kernel variant, shape, dtype, GPU), cached on disk.

The first call for a new key times every candidate config on the real arguments (median of
triton.testing.do_bench), times the close contenders again in alternating rounds, says so on stderr, and
stores the winner in
~/.cache/moetune/autotune.json (or $MOETUNE_CACHE_DIR). Later calls, in any process, read it.
In Triton's interpreter (CPU tests) nothing is timed: the first candidate is used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_lock = threading.Lock()
_memory: dict[str, dict] | None = None
# (device index, kernel name, key) -> (the candidate list, its pick): the per-launch lookup, no disk key built
_picked: dict[tuple, tuple[Sequence[dict], dict]] = {}
_tunings = 0  # picks timed in this process (tunings())


def cache_path() -> Path:
    root = os.environ.get("MOETUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "moetune"
    )
    return Path(os.path.expanduser(root)) / "autotune.json"  # a `~` from a Dockerfile's ENV is not the shell's


def _read(path: Path) -> dict[str, dict] | None:
    """The file's entries: {} where there is none or it is damaged (truncated, not JSON, not a mapping: re-tuned and
    rewritten); None where it exists but cannot be read, which this process then leaves as it is."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as err:
        print(f"moetune: cannot read the autotune cache {path} ({err}); tuning into memory only, the file is left "
              "as it is", file=sys.stderr)
        return None
    except ValueError:  # UnicodeDecodeError included
        return {}
    return entries if isinstance(entries, dict) else {}


_writable = True  # False once the file proved unreadable: writing would replace entries this process never saw


def _load() -> dict[str, dict]:
    global _memory, _writable
    if _memory is None:
        entries = _read(cache_path())
        _writable = entries is not None
        _memory = entries or {}
    return _memory


@contextlib.contextmanager
def _locked(directory: Path):
    """Holds an exclusive lock on the cache's directory (POSIX), so that processes sharing the cache (ranks of one
    job, two jobs) merge their entries instead of writing over each other's; no lock where flock is missing."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _save(entries: dict[str, dict]) -> None:
    """Writes entries merged into what the file holds now (another process may have added some since this one read
    it); the result is also this process's view."""
    path = cache_path()
    _load()  # (whether the file could be read)
    if not _writable:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            on_disk = _read(path)
            if on_disk is None:
                return
            merged = {**on_disk, **entries}
            # This process's temp name (the lock may be missing); created 0666 less the umask, as any new file
            # (tempfile's would be 0600), then given the cache's own mode where there is one.
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "w") as f:
                    json.dump(merged, f, indent=0, sort_keys=True)
                if path.exists():
                    os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
                os.replace(tmp, path)  # atomic: a reader never sees half a file
            finally:
                if tmp.exists():
                    tmp.unlink()  # a failed write (a full disk) leaves no half-written file behind
        if _memory is not None:
            _memory.update(merged)
    except OSError as err:  # a read-only home must not stop training
        print(f"moetune: could not write the autotune cache {path}: {err}", file=sys.stderr)


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def block_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> dict:
    """One candidate: the tile shape (constexprs of the kernel) and its launch parameters."""
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Below this many routed rows a launch takes microseconds: the heuristic first candidate is
# used and nothing is compiled or timed (tuning costs ~1-3 s of compilation per candidate).
MIN_TUNE_ROWS = 8192


# A candidate must beat the first one that ran (the heuristic favourite, unless it did not fit) by this much to
# replace it: timings of configs within a few percent swap places from run to run, and a cached pick should not
# be a coin toss.
MARGIN = 0.03


def _choose(timings: list[tuple[float, dict]], first_bonus_ms: float = 0.0,
            host_ms: Callable[[dict], float] | None = None) -> dict:
    """The fastest config, unless the first timed one is within MARGIN (and first_bonus_ms) of it. host_ms(config):
    host time that config adds to a launch over the others, counted on top of its GPU time."""
    if not timings:
        raise RuntimeError("moetune autotune: no candidate config fits this GPU (all ran out of resources)")
    if host_ms is not None:
        timings = [(ms + host_ms(config), config) for ms, config in timings]
    fastest_ms, fastest = min(timings, key=lambda t: t[0])
    first_ms, first = timings[0]
    return first if first_ms <= fastest_ms * (1 + MARGIN) + first_bonus_ms else fastest


def _time(launch: Callable[[dict], object], config: dict) -> float:
    import triton

    return triton.testing.do_bench(functools.partial(launch, config), warmup=10, rep=40, return_mode="median")


# The close contenders of the first pass are timed again, in rounds that alternate between them: one pass times
# each config in its own ~50 ms window, and clocks and the GPU's other tenants drift between windows (run 39: the
# pick for GLM-4.7-Flash's gate_up dgrad timed 0.19 ms over the best config of a sweep of the same candidates).
FINALISTS = 3
FINALIST_WITHIN = 0.10
ROUNDS = 3


def _retimed_finalists(timings: list[tuple[float, dict]], launch: Callable[[dict], object],
                       host_ms: Callable[[dict], float] | None = None) -> list[tuple[float, dict]]:
    """The first timed config and up to FINALISTS fastest (GPU time plus host_ms) within FINALIST_WITHIN of the
    fastest, each timed by the median of its first-pass time and ROUNDS alternating rounds; in the first pass's
    order, so the first timed config stays first for _choose."""
    if len(timings) < 2:
        return timings
    cost = [ms + (host_ms(config) if host_ms is not None else 0.0) for ms, config in timings]
    ranked = sorted(range(len(timings)), key=cost.__getitem__)
    chosen = {0} | {i for i in ranked[:FINALISTS] if cost[i] <= cost[ranked[0]] * (1 + FINALIST_WITHIN)}
    if len(chosen) < 2:
        return timings[:1]
    order = sorted(chosen)
    samples = {i: [timings[i][0]] for i in order}
    for round_ in range(ROUNDS):
        for i in order[round_ % len(order):] + order[:round_ % len(order)]:  # each round starts one later
            samples[i].append(_time(launch, timings[i][1]))
    return [(statistics.median(samples[i]), timings[i][1]) for i in order]


def _device_fault(err: Exception) -> bool:
    """A failure of the GPU itself (illegal address, launch failure), as opposed to one config not compiling."""
    text = str(err).lower()
    return isinstance(err, getattr(torch, "AcceleratorError", ())) or any(fault in text for fault in _FAULTS)


# Sticky CUDA errors: after one, the context is unusable (a descriptor that fails to encode is not one of them).
_FAULTS = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address",
           "illegal instruction", "device-side assert")


def tunings() -> int:
    """How many picks this process has timed so far: a step during which it grew held tuning's buffers at its peak."""
    return _tunings


# A tuning runs with the launch's GPU current: do_bench times on the current GPU's stream (tests without a GPU replace
# this).
_on_gpu = torch.cuda.device


def pick(name: str, key: tuple, candidates: Sequence[dict], launch: Callable[[dict], object], device,
         num_rows: int, first_bonus_ms: float = 0.0, host_ms: Callable[[dict], float] | None = None) -> dict:
    """The fastest of `candidates` for this key; `launch(config)` must be safe to repeat. Costs the GPU timing does
    not see (do_bench times the GPU while the host runs ahead): first_bonus_ms, the first candidate also keeps its
    place against one at most that much faster; host_ms(config), host time a config adds to each launch, counted
    on top of its GPU time."""
    small = num_rows < MIN_TUNE_ROWS
    if small or interpreted() or torch.device(device).type != "cuda" or len(candidates) == 1:
        return candidates[0]
    import triton

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Every launch comes through here: answer repeats from memory before building the disk key.
    seen = _picked.get((index, name, key))
    if seen is not None and seen[0] == candidates:
        return seen[1]
    gpu = _gpu_name(index)
    # The candidate list is part of the key: a release that changes what is tried re-tunes instead of
    # reusing a winner picked from an older list.
    digest = hashlib.sha1(json.dumps(candidates, sort_keys=True).encode()).hexdigest()[:8]
    full_key = f"{gpu}|triton {triton.__version__}|{name}|{key}|{digest}"
    as_stored = [json.loads(json.dumps(config)) for config in candidates]  # what a cached pick reads back as
    with _lock:
        hit = _load().get(full_key)
        if hit not in as_stored:  # a miss, or an entry edited or damaged on disk: look again, then tune
            hit = ((_read(cache_path()) if _writable else None) or {}).get(full_key)  # tuned meanwhile elsewhere?
    if hit in as_stored:
        hit = candidates[as_stored.index(hit)]
        _picked[(index, name, key)] = (candidates, hit)
        return hit
    print(f"moetune: tuning {name} {key} on {gpu} (once; cached in {cache_path()})", file=sys.stderr)
    global _tunings
    _tunings += 1
    with _on_gpu(index):  # (each launch runs on its operands' GPU, launch.py; do_bench times the current one)
        best = _tune(launch, candidates, first_bonus_ms, host_ms)
    with _lock:
        entries = _load()
        entries[full_key] = best
        _save({full_key: best})
    _picked[(index, name, key)] = (candidates, best)
    return best


def _tune(launch: Callable[[dict], object], candidates: Sequence[dict], first_bonus_ms: float,
          host_ms: Callable[[dict], float] | None) -> dict:
    """Times every candidate that compiles and fits, then the close ones again (see pick)."""
    timings = []
    for config in candidates:
        try:
            ms = _time(launch, config)
        except Exception as err:  # noqa: BLE001 - a config that does not compile/fit (e.g. out of shared memory)
            if _device_fault(err):  # the CUDA context is broken (a bad access): no later candidate could run
                raise
            # TMA descriptors vary across Triton/driver versions, and so do the flattened loop of a persistent
            # kernel and Gluon's API: drop the candidate, not the run.
            if config.get("TMA_B") or config.get("TMA_A") or config.get("PERSISTENT") or config.get("GLUON"):
                print(f"moetune: skipping config {config} ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                      file=sys.stderr)
                continue
            if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err).lower():
                raise
            continue
        timings.append((ms, config))
    return _choose(_retimed_finalists(timings, launch, host_ms), first_bonus_ms, host_ms)
