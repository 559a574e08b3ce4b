"""Starting or joining Ray the same way for every job, and keeping Ray's internals off
the user's terminal: a job prints its own progress lines; Ray's INFO lines, progress bars
and known false alarms go to the session's log files only. Ray's warnings and errors
(a lost node, an out-of-memory kill, a failed task) still reach the terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator

import ray

from maskrcnn.errors import EXPECTED, root_cause

# Lines Ray prints at ERROR level that are not errors for these jobs. Ray Data passes its
# context to every actor-pool actor as an object-store argument, and Ray Core warns that
# restarting such an actor could fail if that argument were lost (ray-project/ray#57733).
# Here the driver holds those objects for the whole job, and actor restarts work: the
# multi-node test kills the inference node and checks that every image is written.
FALSE_ALARMS = (b"has constructor arguments in the object store and max_restarts > 0",)


def init_ray(min_cpus: int, *, dashboard: bool = False) -> None:
    """Join the cluster under ``ray job submit`` (RAY_ADDRESS is set); otherwise start a
    local Ray with at least ``min_cpus`` logical CPUs, so that actors or training workers
    and the CPU data tasks beside them can all be scheduled on a small machine. A local Ray
    starts its dashboard only with ``dashboard``: its processes cost a run about 3 s of start
    (the jobs print their own progress), but Ray Train's placement-group cleaner asks the
    dashboard's state API whether the training controller still lives."""
    quiet_logs()
    if ray.is_initialized():
        return
    hook = {"worker_process_setup_hook": quiet_logs}
    if os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(runtime_env=hook, logging_level=logging.WARNING)
        except ValueError:  # the job's own runtime_env has a setup hook: keep the user's
            ray.init(logging_level=logging.WARNING)
        return
    # A private local instance: "local", not a `ray start` left running on this machine,
    # which ray.init would otherwise join. Its token-auth notice asks nothing of the user.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    cpus = max(os.cpu_count() or 1, min_cpus)
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=dashboard,
        runtime_env=hook,
        logging_level=logging.WARNING,
    )


def on_this_node() -> dict:
    """Ray options that keep an actor on the driver's own node: a lost worker node (a spot
    instance) must not take the job's counts with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def quiet_logs() -> None:
    """Ray Data's console output at WARNING and above (its log file keeps everything).
    Runs in the driver and, as Ray's ``worker_process_setup_hook``, in every worker."""
    import ray.data  # configures the "ray.data" logger; adjust it after, not before

    for handler in logging.getLogger("ray.data").handlers:
        if not type(handler).__name__.endswith("FileHandler"):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _NotUserErrors) for f in handler.filters):
                handler.addFilter(_NotUserErrors())
    # The one warning that disabling progress bars prints, once per process.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the jobs print their own progress with totals
    context.print_on_execution_start = False


class _NotUserErrors(logging.Filter):
    """Keeps Ray Data's console report of a failed task (its traceback, its retry advice)
    off the terminal when the error is one the user can fix (:data:`~maskrcnn.errors.EXPECTED`),
    such as a listing that changed under a resumed run: the job prints that as its one-line
    error. A defect's report stays, as its traceback does. Ray Data logs it while handling the
    exception, so the exception is the record's or the one being handled (a RayTaskError of
    one of ours is an instance of it too). Its log file keeps the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return err is None or not isinstance(root_cause(err), EXPECTED)


@contextlib.contextmanager
def without_false_alarms() -> Iterator[None]:
    """While Ray runs, drop the lines of :data:`FALSE_ALARMS` from this process's stderr
    (file descriptor 2, where Ray's C++ core and the worker log forwarding both write).
    Every other line passes through unchanged. Enter it after Ray has started, so that
    Ray's own processes keep the real stderr."""
    sys.stderr.flush()
    saved, real = os.dup(2), os.dup(2)  # one to restore, one for the pump to write to
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:  # must keep draining whatever happens, or a full pipe blocks the job
        with os.fdopen(read, "rb") as lines, os.fdopen(real, "wb", buffering=0) as out:
            for line in lines:
                if not any(alarm in line for alarm in FALSE_ALARMS):
                    with contextlib.suppress(OSError):  # e.g. the terminal went away
                        out.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump drains and stops
        os.close(saved)
        thread.join(timeout=5)
