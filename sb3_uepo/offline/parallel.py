"""Offline stages side by side: the stages that read no other stage's output, each in its own worker process.

Owns: :func:`run_side_by_side` (a spawned process per stage, their progress bars in the parent, their logged values
replayed into the parent's logger), :class:`RecordingLogger` and the progress relay of the workers. Must not touch:
what a stage computes, how it is seeded or checkpointed (``pipeline.py``: a worker calls the very method the sequential
path calls, ``OfflinePretrainer.compute_stage``, so a stage gives the same weights either way when the worker has
the parent's torch thread count).

The behaviour model, the IQL critics and the dynamics ensemble read only the dataset (so do the Gaussian members of
the ``uni_o4`` preset); on a machine with a free core, training them side by side takes about the time of the longest
instead of their sum. Workers are spawned (not forked: a forked process would inherit the parent's torch thread pool)
and receive the pretrainer's inputs by pickling.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from sb3_uepo.offline import config as config_module

# where a worker's progress bars report: the queue _worker_main sets (None in the parent)
_progress_queue: Any = None


class RecordingLogger:
    """Stands in for an SB3 logger in a worker: keeps every ``record`` / ``dump`` for the parent to replay."""

    def __init__(self) -> None:
        self.dumps: list[tuple[int, dict[str, Any]]] = []
        self._pending: dict[str, Any] = {}

    def record(self, key: str, value: Any, exclude: Any = None) -> None:
        self._pending[key] = value

    def dump(self, step: int = 0) -> None:
        self.dumps.append((step, self._pending))
        self._pending = {}


def replay(records: list[tuple[int, dict[str, Any]]], logger: Any) -> None:
    """Write what a :class:`RecordingLogger` kept into ``logger`` (SB3 ``record`` / ``dump``), in the same order."""
    if logger is None:
        return
    for step, values in records:
        for key, value in values.items():
            logger.record(key, value)
        logger.dump(step=step)


class _RelayBar:
    """A worker's progress bar: sends its progress to the parent, which draws it (tqdm's interface, the parts used)."""

    def __init__(self, total: int, desc: str, sink: Any) -> None:
        self.total, self.desc, self.sink, self.n, self._sent = total, desc, sink, 0, 0
        self._every = max(total // 200, 1)
        self.sink.put(("open", desc, total, ""))

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._sent >= self._every or self.n >= self.total:
            self.sink.put(("update", self.desc, self.n - self._sent, ""))
            self._sent = self.n

    def set_postfix(self, **values: Any) -> None:
        self.sink.put(("postfix", self.desc, 0, ", ".join(f"{k}={v}" for k, v in values.items())))

    def close(self) -> None:
        if self.n > self._sent:
            self.sink.put(("update", self.desc, self.n - self._sent, ""))
            self._sent = self.n
        self.sink.put(("close", self.desc, 0, ""))


def _relay_or_tqdm(total: int, enabled: bool, desc: str) -> Any:
    if enabled and _progress_queue is not None:
        return _RelayBar(total, desc, _progress_queue)
    return config_module.tqdm_bar(total, enabled, desc)


class WorkerError(RuntimeError):
    """A worker process stopped without a result (killed, or it could not start)."""


def _watch_parent(parent: int) -> None:
    """Leave at once when the parent process is gone (killed): a worker must not train on for nobody."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _worker_main(init_kwargs: dict[str, Any], name: str, results: Any, progress: Any, threads: int, parent: int) -> None:
    """A worker process: compute stage ``name`` and put ``(name, payload bytes, report, seconds, logged, error)``."""
    global _progress_queue
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    _progress_queue = progress
    config_module.progress_bar_factory = _relay_or_tqdm
    try:
        from sb3_uepo.offline.pipeline import OfflinePretrainer

        logger = RecordingLogger()
        pretrainer = OfflinePretrainer(**init_kwargs, logger=logger, checkpoint_dir=None, verbose=0)
        start = time.time()
        _output, payload, report = pretrainer.compute_stage(name)
        buffer = io.BytesIO()  # tensors as bytes: nothing to fetch from this process once it has left
        torch.save(payload, buffer)
        results.put((name, buffer.getvalue(), report, time.time() - start, logger.dumps, None))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        pass
    except BaseException:  # sent to the parent, which raises it
        results.put((name, None, None, 0.0, [], traceback.format_exc()))


Done = Callable[[str, dict[str, Any], dict[str, Any], float, list], None]


def run_side_by_side(names: list[str], init_kwargs: dict[str, Any], n_jobs: int, progress_bar: bool, on_done: Done) -> None:
    """Compute the stages ``names`` in up to ``n_jobs`` spawned worker processes at a time.

    :param names: stages that read no other stage's output (started in this order)
    :param init_kwargs: the ``OfflinePretrainer`` arguments a worker rebuilds it from (dataset, spaces, config, ...)
    :param n_jobs: worker processes at a time
    :param progress_bar: draw each stage's progress bar in this process
    :param on_done: called here as each stage finishes, with its name, checkpoint payload, report, seconds and the
        values it logged (so that it is checkpointed at once, not when the slowest one ends)
    :raises WorkerError: a worker stopped without a result
    :raises RuntimeError: a stage failed in its worker (the worker's traceback in the message)
    """
    context = mp.get_context("spawn")
    results, progress = context.Queue(), (context.Queue() if progress_bar else None)
    waiting, running, bars = list(names), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < n_jobs:
                name = waiting.pop(0)
                process = context.Process(
                    target=_worker_main,
                    args=(init_kwargs, name, results, progress, torch.get_num_threads(), os.getpid()),
                    name=f"uepo-offline-{name}",
                    daemon=True,
                )
                process.start()
                running[name] = process
            _drain(progress, bars)
            try:
                name, data, report, seconds, logged, error = results.get(timeout=0.2)
            except queue.Empty:
                for name, process in running.items():
                    if not process.is_alive() and results.empty():
                        raise WorkerError(f"the worker of stage {name!r} stopped (exit code {process.exitcode})") from None
                continue
            running.pop(name).join()
            if error is not None:
                raise RuntimeError(f"stage {name!r} failed in its worker process:\n{error}")
            payload = torch.load(io.BytesIO(data), weights_only=False)
            _drain(progress, bars)
            on_done(name, payload, report, seconds, logged)
    finally:
        for process in running.values():
            process.terminate()
            process.join()
        _drain(progress, bars)
        for bar in bars.values():
            bar.close()


def _drain(progress: Any, bars: dict[str, Any]) -> None:
    """Draw the progress the workers sent since the last call."""
    if progress is None:
        return
    while True:
        try:
            kind, desc, n, text = progress.get_nowait()
        except queue.Empty:
            return
        if kind == "open":
            bars[desc] = config_module.tqdm_bar(n, True, desc)
        elif desc in bars and kind == "update":
            bars[desc].update(n)
        elif desc in bars and kind == "postfix":
            bars[desc].set_postfix_str(text)
        elif desc in bars and kind == "close":
            bars.pop(desc).close()
