"""Timing harness for benchmarks that must hold on a shared, busy machine.

Each contender (a configuration to time) lives in its own worker process, started with the "spawn"
method so that nothing of the parent or of another contender is in its memory: its peak resident
memory is its own. The parent only drives: in every round it asks each worker in turn (the order
rotated every round, so that a burst of load elsewhere does not always hit the same contender) to
run one step, and waits for the step's time before asking the next, so that steps never overlap.

* CPU: the time of a step is the CPU seconds of the worker process (``time.process_time``) with
  ``torch.set_num_threads(threads)`` (default 1). CPU time does not count the time the process
  waits for a core that another job holds, and one thread never waits for a sibling thread that
  lost its core; wall time on a 2-core machine shared with other jobs does both.
* CUDA: CUDA events around the step, after a ``synchronize``.
* Memory: on CPU the resident set (``VmRSS``, ``VmHWM`` of ``/proc/self/status``); on CUDA also
  ``torch.cuda.max_memory_allocated`` over the steps. The high-water mark is reset after the
  build, so ``peak_rss - base_rss`` is what the steps add on top of the built model. (Not
  ``ru_maxrss``: a spawned child starts with its parent's maximum, the exec keeps it.)

Ratios are reported two ways: the median of the per-round ratios ``t / t_ref`` (each round's
steps ran close together in time, under about the same load) and the ratio of the minima (each
contender's least disturbed step).

    from harness import Contender, compare, ratios, add_common_args, table

``build`` functions must be module-level (picklable by reference) and import what they need; the
script that defines them must guard its ``main()`` with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

#: seconds the parent waits between checks that a busy worker is still alive
POLL_S = 0.5


@dataclasses.dataclass
class Contender:
    """A configuration to time: ``build(**kwargs)`` runs in the contender's own process.

    ``build`` returns the step to time (a callable without arguments), or ``(step, info)`` where
    ``info`` is a JSON-able dict handed back in :attr:`Result.info` (trainable counts, FLOPs...)
    as it is after the last step: a step may add to it (work done in the build would count in the
    base memory).
    """

    name: str
    build: Callable[..., Any]
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    """What one contender measured: step times (seconds) and memory (bytes)."""

    name: str
    times: list[float]
    base_rss: int  # resident bytes after the build, before the first step
    peak_rss: int  # resident high-water mark over the steps (reset after the build)
    cuda_peak: int | None  # torch.cuda.max_memory_allocated over the steps; None on CPU
    info: dict
    wall_times: list[float] = dataclasses.field(default_factory=list)  # wall seconds of the same steps

    @property
    def above_base(self) -> int:
        """Resident bytes the steps added on top of the built model."""
        return self.peak_rss - self.base_rss


class ContenderError(RuntimeError):
    """A contender's build or step failed in its worker, or the worker died."""


# --- worker side ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; ``None`` off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident bytes of this process now."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """Resident high-water mark of this process in bytes (since its start or the last reset)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident size (Linux ``clear_refs``); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, so that a killed benchmark leaves no orphan."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Timer:
    """Times one call: CPU seconds of the process, or CUDA-event milliseconds on CUDA; also wall time."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch

            self.torch = torch
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, step: Callable[[], Any]) -> tuple[float, float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            wall = time.perf_counter()
            self.start.record()
            step()
            self.end.record()
            self.torch.cuda.synchronize()
            return self.start.elapsed_time(self.end) / 1000, time.perf_counter() - wall
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        return time.process_time() - cpu, time.perf_counter() - wall


def _build(contender: Contender, device: str, threads: int) -> tuple[Callable[[], Any], dict]:
    """Set the thread count, run the contender's build and split its answer into (step, info).

    torch's thread count is set before the build when torch is already imported (the script that
    defines the build normally imports it) and again after it; a build without torch never loads it.
    """
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    out = contender.build(**contender.kwargs)
    step, info = out if isinstance(out, tuple) else (out, {})
    if not callable(step):
        raise TypeError(f"build of {contender.name!r} returned {type(step).__name__}, not a step callable")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    if not isinstance(info, dict):
        raise TypeError(f"build of {contender.name!r} returned info of type {type(info).__name__}, not a dict")
    return step, info  # the same dict: steps may add to it


def _worker(conn: Any, contender: Contender, device: str, threads: int) -> None:
    """A contender's process: build, then answer the parent's commands until told to finish.

    After the build it answers ``("ready", base_rss, info)``. Commands: ``"step"`` (run and time one step;
    answers ``("time", cpu_or_cuda_s, wall_s)``) and
    ``"finish"`` (answers ``("done", peak_rss, cuda_peak, info)``: the info dict again, which a step
    may have added to, e.g. FLOPs counted during a warm-up step). Any exception is sent back as
    ``("error", traceback text)``. SIGINT is ignored: the parent decides when workers stop.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        step, info = _build(contender, device, threads)
        import gc

        gc.collect()
        base = current_rss()
        if not reset_peak_rss():
            print(f"harness: {contender.name}: cannot reset the peak RSS; its peak includes the build",
                  file=sys.stderr)
        conn.send(("ready", base, info))  # info too: an info that cannot be pickled fails here, not at the end
        timer = _Timer(device)
        while True:
            command = conn.recv()
            if command == "step":
                conn.send(("time", *timer(step)))
            elif command == "finish":
                cuda_peak = None
                if device.startswith("cuda"):
                    import torch

                    cuda_peak = int(torch.cuda.max_memory_allocated())
                conn.send(("done", max(peak_rss(), base), cuda_peak, info))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
    except EOFError:  # the parent went away
        return
    except BaseException:
        with contextlib.suppress(OSError, ValueError):  # the parent may be gone already
            conn.send(("error", traceback.format_exc()))


# --- parent side ----------------------------------------------------------------------------------


class _Handle:
    """The parent's end of one worker: its process, its pipe, and a receive that notices death."""

    def __init__(self, ctx: Any, contender: Contender, device: str, threads: int) -> None:
        self.name = contender.name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, contender, device, threads),
                                   name=f"bench:{contender.name}", daemon=True)
        self.process.start()
        child.close()

    def receive(self, expect: str, phase: str) -> tuple:
        """The worker's next message of kind ``expect``; raises :class:`ContenderError` on its error or death."""
        while not self.conn.poll(POLL_S):
            if not self.process.is_alive():
                break
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1)
            raise ContenderError(f"contender {self.name!r}: its worker died during {phase} "
                                 f"(exit code {self.process.exitcode}; killed for memory?)") from None
        if message[0] == "error":
            raise ContenderError(f"contender {self.name!r} failed during {phase}; its traceback:\n{message[1]}")
        if message[0] != expect:
            raise ContenderError(f"contender {self.name!r}: expected {expect!r}, got {message[0]!r}")
        return message[1:]

    def stop(self) -> None:
        """End the worker: politely (terminate), then for sure (kill)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index``: who steps first changes every round."""
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def compare(contenders: Sequence[Contender], rounds: int = 7, warmup: int = 2, device: str = "cpu",
            threads: int = 1) -> dict[str, Result]:
    """Time each contender's step in interleaved rounds, each contender in its own process.

    All workers are started and built at once (their builds overlap; nothing is timed yet), then
    every round asks each worker in turn, the order rotated per round, for one step and waits for
    it; the first ``warmup`` rounds are not recorded. Workers are ended on any error and on
    KeyboardInterrupt.
    """
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique: {names}")
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    ctx = multiprocessing.get_context("spawn")
    handles: dict[str, _Handle] = {}
    try:
        for contender in contenders:
            handles[contender.name] = _Handle(ctx, contender, device, threads)
        base = {}
        for name in names:
            base[name] = handles[name].receive("ready", "build")[0]
        times: dict[str, list[float]] = {n: [] for n in names}
        walls: dict[str, list[float]] = {n: [] for n in names}
        for round_index in range(warmup + rounds):
            for name in rotated(names, round_index):
                handles[name].conn.send("step")
                t, wall = handles[name].receive("time", f"step (round {round_index + 1})")
                if round_index >= warmup:
                    times[name].append(t)
                    walls[name].append(wall)
        results = {}
        for name in names:
            handles[name].conn.send("finish")
            peak, cuda_peak, final_info = handles[name].receive("done", "finish")
            results[name] = Result(name, times[name], base[name], peak, cuda_peak, final_info, walls[name])
            handles[name].process.join(10)
        return results
    finally:
        for handle in handles.values():
            handle.stop()


def round_ratios(results: dict[str, Result], name: str, reference: str) -> list[float]:
    """Per-round ratios ``t / t_ref`` of contender ``name`` (same round, same load)."""
    return [t / r for t, r in zip(results[name].times, results[reference].times, strict=True)]


def ratios(results: dict[str, Result], reference: str) -> dict[str, tuple[float, float]]:
    """For every contender: (median of per-round ratios t/t_ref, min(t)/min(t_ref))."""
    ref_min = min(results[reference].times)
    return {name: (statistics.median(round_ratios(results, name, reference)), min(r.times) / ref_min)
            for name, r in results.items()}


def spread(results: dict[str, Result], name: str, reference: str) -> tuple[float, float]:
    """Lowest and highest per-round ratio: how much the machine moved the ratio between rounds."""
    values = round_ratios(results, name, reference)
    return min(values), max(values)


def add_common_args(parser: argparse.ArgumentParser, rounds: int = 7, warmup: int = 2) -> argparse.ArgumentParser:
    """``--rounds --warmup --threads --device`` (the device defaults to cuda when available)."""
    parser.add_argument("--rounds", type=int, default=rounds, help="recorded rounds (one step of each contender)")
    parser.add_argument("--warmup", type=int, default=warmup, help="rounds run first and not recorded")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker; 1 keeps CPU times stable on a shared machine")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return parser


def resolve_device(args: argparse.Namespace) -> str:
    """``args.device``, or cuda when torch sees a GPU and cpu otherwise (sets ``args.device``)."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


# --- reporting ------------------------------------------------------------------------------------


def mib(value: int | None) -> str:
    """Bytes as MiB with one decimal; ``-`` for None."""
    return "-" if value is None else f"{value / 2**20:,.1f}"


def table(results: dict[str, Result], reference: str, extra: dict[str, Callable[[Result], Any]] | None = None,
          ref_label: str | None = None) -> str:
    """A markdown table: ratios to ``reference`` (median of per-round, of minima, per-round range), memory.

    ``extra`` adds columns before the ratios: header → function of the Result (e.g. a trainable count).
    """
    extra = extra or {}
    cuda = any(r.cuda_peak is not None for r in results.values())
    ref = ref_label or reference
    headers = ["contender", *extra, "median s", f"/ {ref} (median of rounds)", f"/ {ref} (of minima)",
               "per-round range", "peak RSS MiB", "above base MiB"] + (["CUDA peak MiB"] if cuda else [])
    rows = []
    by_ratio = ratios(results, reference)
    for name, r in results.items():
        median_ratio, min_ratio = by_ratio[name]
        low, high = spread(results, name, reference)
        row = [name, *(str(f(r)) for f in extra.values()), f"{statistics.median(r.times):.4f}",
               f"{median_ratio:.3f}", f"{min_ratio:.3f}", f"{low:.2f} to {high:.2f}", mib(r.peak_rss),
               mib(r.above_base)]
        rows.append(row + ([mib(r.cuda_peak)] if cuda else []))
    return markdown(headers, rows)


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table; columns after the first are right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """One line on how the numbers were taken (for the head of a printed table)."""
    how = ("CUDA-event time" if args.device.startswith("cuda")
           else f"CPU seconds of each process (time.process_time), {args.threads} thread(s)")
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (f"{how}; {args.rounds} interleaved rounds (order rotated) after {args.warmup} warm-up; "
            f"one process per contender{load}")


def fmt_count(value: Any) -> str:
    """An integer with thousands separators; other values as they are."""
    return f"{value:,}" if isinstance(value, int) else str(value)
