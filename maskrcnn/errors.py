"""The one base class of the errors a user can fix: bad flags, input, storage or weights.

:func:`maskrcnn.cli.run_main` reports any of them (and ``ValueError``) as one line with exit
status 2, without having to import the modules that raise them.
"""


class UserError(RuntimeError):
    """A problem with the job's flags, input, storage or environment; the message names it."""
