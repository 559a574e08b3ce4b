"""The errors a user can fix, which a job reports as one line naming the problem.

:func:`maskrcnn.cli.run_main` reports any of :data:`EXPECTED` as one line with exit status 2,
without having to import the modules that raise them; anything else is a defect, reported
with its traceback (exit status 1).
"""


class UserError(RuntimeError):
    """A problem with the job's flags, input, storage or environment; the message names it."""


# A ValueError is a usage error: a flag's value or combination that the job checks where it
# is used (the config dataclasses' checks, export's "nothing to draw", ...).
EXPECTED = (UserError, ValueError)
