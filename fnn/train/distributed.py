"""Training with several processes on one machine or several: start them, join them.

Each process runs the same program. It first joins the others (:func:`initialize`, or
:func:`initialize_from_env` under :func:`launch`), before any other JAX call; then
``jax.devices()`` lists the devices of every process and
``fnn.train.data_parallel(..., mode="sharded")`` trains on all of them. Every process builds the
same initial train state (same seed) and feeds only its share of each global batch of ``B``
rows: process ``i`` of ``P`` takes rows ``[i * B / P, (i + 1) * B / P)``. Together the shares
form the global batch a single process would train on, so the result matches a one-process run
up to float rounding.

:func:`launch` starts ``P`` local copies of a command with the environment variables
``FNN_COORDINATOR`` (``127.0.0.1:PORT``), ``FNN_NUM_PROCESSES`` and ``FNN_PROCESS_ID`` that
:func:`initialize_from_env` reads. The coordinator only ever binds the address it is given
(never every interface).
"""

from __future__ import annotations

import collections
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

import jax

ENV_COORDINATOR = "FNN_COORDINATOR"  # "host:port" of process 0's coordinator service
ENV_NUM_PROCESSES = "FNN_NUM_PROCESSES"
ENV_PROCESS_ID = "FNN_PROCESS_ID"  # 0 .. FNN_NUM_PROCESSES - 1
_ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
# the same three under JAX's names, read when none of fnn's is set
_JAX_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_TAIL_LINES = 20  # lines of a failed process's output repeated in the failure message
_JOIN_S = 2.0  # how long to wait for a reader thread to copy the last output lines


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               timeout_s: float = 60.0) -> None:
    """Joins this process to ``num_processes`` processes (``jax.distributed.initialize``).

    ``coordinator_address`` is ``"host:port"``; process 0 serves it, bound to exactly that
    address. Must run before any other JAX call (computations, ``jax.devices()``,
    ``create_train_state``). Waits up to ``timeout_s`` seconds for every process to join, and
    at shutdown for the others to finish, then fails instead of hanging.
    """
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"initialize: coordinator_address must be 'host:port', got "
                         f"{coordinator_address!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"initialize: num_processes must be a positive int, got "
                         f"{num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"initialize: process_id must be in [0, {num_processes}), got "
                         f"{process_id!r}")
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize: this process has already joined a distributed run; "
                           "call it once per process")
    seconds = max(1, math.ceil(timeout_s))
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   coordinator_bind_address=coordinator_address,
                                   initialization_timeout=seconds,
                                   shutdown_timeout_seconds=seconds)
    except RuntimeError as error:
        if "must be called before" not in str(error):
            raise
        raise RuntimeError(
            "initialize: JAX is already initialised in this process (a computation, "
            "jax.devices() or create_train_state ran before it); call "
            "fnn.train.distributed.initialize first, before any other JAX call") from error


def initialize_from_env(*, timeout_s: float = 60.0) -> bool:
    """:func:`initialize` from ``FNN_COORDINATOR``, ``FNN_NUM_PROCESSES`` and ``FNN_PROCESS_ID``
    (set by :func:`launch`), or else from JAX's ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Returns False, doing nothing, when none of
    them is set."""
    names = _ENV_VARS
    if all(os.environ.get(name) is None for name in names):
        names = _JAX_ENV_VARS
    values = {name: os.environ.get(name) for name in names}
    if all(value is None for value in values.values()):
        return False
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"initialize_from_env: {', '.join(names)} must be set together; "
                         f"missing {', '.join(missing)}")
    numbers = {}
    coordinator, count, index = names
    for name in (count, index):
        try:
            numbers[name] = int(values[name])
        except ValueError:
            raise ValueError(f"initialize_from_env: {name} must be an integer, got "
                             f"{values[name]!r}") from None
    initialize(values[coordinator], numbers[count], numbers[index], timeout_s=timeout_s)
    return True


def launch(argv: Sequence[str], num_processes: int, *, port: int | None = None,
           timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs ``num_processes`` local copies of the command ``argv`` as one distributed run; the
    command joins the run with :func:`initialize_from_env`.

    Each copy gets ``env`` (default: this process's environment) plus ``FNN_COORDINATOR=
    127.0.0.1:port`` (default: a free port), ``FNN_NUM_PROCESSES`` and ``FNN_PROCESS_ID``. Their
    output is streamed to this process's stdout, each line prefixed ``[process i]``.

    Returns 0 when every copy exits with 0. When one exits otherwise, the others are killed and
    its exit code is returned (1 when it died from a signal), after a message on stderr that
    names it and repeats its last lines of output. After ``timeout_s`` seconds all are killed
    and 124 is returned.
    """
    argv = list(argv)
    if not argv:
        raise ValueError("launch: argv must name a command, got an empty list")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"launch: num_processes must be a positive int, got {num_processes!r}")
    coordinator = f"127.0.0.1:{_free_port() if port is None else port}"
    base = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []  # copy each process's output to stdout
    waiters: list[threading.Thread] = []  # report each process's exit
    tails: list[collections.deque] = []
    exits: queue.Queue[int] = queue.Queue()  # process indices in the order they exit
    try:
        for i in range(num_processes):
            child_env = base | {ENV_COORDINATOR: coordinator,
                                ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(i)}
            # a session of its own, so that killing it takes its children along
            procs.append(subprocess.Popen(argv, env=child_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          text=True, errors="replace",
                                          start_new_session=True))
            tails.append(collections.deque(maxlen=_TAIL_LINES))
            readers.append(threading.Thread(target=_stream, args=(procs[i], i, tails[i]),
                                            daemon=True))
            waiters.append(threading.Thread(target=_report_exit, args=(procs[i], i, exits),
                                            daemon=True))
            readers[i].start()
            waiters[i].start()
        return _wait(procs, exits, tails, readers, timeout_s)
    finally:
        _kill(procs)  # a no-op when all exited; else after a failure, timeout or Ctrl-C
        for thread in readers + waiters:
            thread.join(timeout=_JOIN_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(proc: subprocess.Popen, index: int, tail: collections.deque) -> None:
    """Copies a process's output to stdout line by line, keeping its last lines."""
    for line in proc.stdout:
        tail.append(line)
        sys.stdout.write(f"[process {index}] {line}")
        sys.stdout.flush()


def _report_exit(proc: subprocess.Popen, index: int, exits: queue.Queue) -> None:
    proc.wait()
    exits.put(index)


def _wait(procs: list[subprocess.Popen], exits: queue.Queue, tails: list[collections.deque],
          readers: list[threading.Thread], timeout_s: float | None) -> int:
    """Waits until every process exited 0 (returns 0), one failed, or the time ran out.

    Exits are taken in the order they happen, so the process that failed first is the one
    reported, not a peer that failed because of it.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    running = set(range(len(procs)))
    while running:
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        try:
            i = exits.get(timeout=max(0.0, wait))
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                _kill(procs)
                print(f"launch: timed out after {timeout_s} s with processes {sorted(running)} "
                      f"still running; stopped them", file=sys.stderr)
                return 124
            continue
        running.discard(i)
        code = procs[i].returncode
        if code != 0:
            _kill(procs)
            readers[i].join(timeout=_JOIN_S)  # its output, up to the last line
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            last = "".join(tails[i]) or "(no output)\n"
            print(f"launch: process {i} of {len(procs)} {how}; stopped the other processes. "
                  f"Its last output:\n{last}", file=sys.stderr, end="")
            return code if code > 0 else 1
    return 0


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kills every process still running, with its children, and reaps it.

    SIGKILL rather than SIGTERM: JAX's distributed runtime catches SIGTERM as a preemption
    notice and keeps running, and a peer of a failed process has nothing left to save.
    """
    for proc in procs:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # exited in the meantime
                pass
    for proc in procs:
        proc.wait()
