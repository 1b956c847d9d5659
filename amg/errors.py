"""The project's own error type for bad input: the `amg` command reports it as a message and
exit status 2. Anything else (a bug, a failure inside torch, an export that disagrees with
PyTorch) keeps its traceback: it is not the user's input to fix."""


class InputError(ValueError):
    """Input that cannot be used (a value out of range, a malformed file, an unknown name);
    the message names the problem. A ValueError, so callers that expect one still work."""


class Unplannable(InputError):
    """A configuration that cannot be made here: a limit of the method (a MACs saving out of
    reach) or an optional tool that is not installed. The suite skips it with this reason."""


class OutOfReach(Unplannable):
    """A MACs saving that a pruning mode cannot reach on this model (not a bug: a limit)."""
