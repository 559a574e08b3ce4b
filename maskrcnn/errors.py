"""The errors a user can fix, which a job reports as one line naming the problem, and
:func:`root_cause`, which finds ours inside Ray's wrappers.

:func:`maskrcnn.cli.run_main` reports any of :data:`EXPECTED` as one line with exit status 2,
without having to import the modules that raise them; anything else is a defect, reported
with its traceback (exit status 1).
"""

from __future__ import annotations

import re
import sys


class UserError(RuntimeError):
    """A problem with the job's flags, input, storage or environment; the message names it."""


# A ValueError is a usage error: a flag's value or combination that the job checks where it
# is used (the config dataclasses' checks, export's "nothing to draw", ...).
EXPECTED = (UserError, ValueError)


def root_cause(err: BaseException) -> BaseException:
    """Ray wraps worker and task errors (TrainingFailedError -> worker error -> ours,
    RayTaskError(ours) from a Ray Data task); find ours."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        original = getattr(err, "cause", None)  # a RayTaskError carries the task's own exception
        if isinstance(original, BaseException):
            err = original
            continue
        if isinstance(err, EXPECTED):
            return err
        if getattr(err, "actor_init_failed", False):
            return _init_error(err)
        nxt = err.__cause__ or err.__context__
        for attr in ("worker_failures", "errors"):
            failures = getattr(err, attr, None)
            if isinstance(failures, dict) and failures:
                nxt = next(iter(failures.values()))
        if nxt is None:
            return err
        err = nxt
    return err


# The last line of Ray's report of an actor whose __init__ raised one of ours.
_RAISED = re.compile(r"^\s*(maskrcnn(?:\.\w+)+)\.(\w+): (.+)$", re.M)


def _init_error(err: BaseException) -> BaseException:
    """Ray reports an actor whose ``__init__`` raised as a RayActorError that keeps only the
    text of the exception (its type and message, last); one of ours the user can fix (a GPU
    node that cannot start CUDA) is rebuilt as a UserError with that message."""
    found = _RAISED.findall(str(err))
    if not found:
        return err
    module, name, message = found[-1]
    kind = getattr(sys.modules.get(module), name, None)
    return UserError(message) if isinstance(kind, type) and issubclass(kind, EXPECTED) else err
