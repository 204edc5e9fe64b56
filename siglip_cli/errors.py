"""The one exception type the CLI turns into a one-sentence message and a non-zero exit."""


class UserError(Exception):
    """Something the user can fix (a path, an option, a checkpoint); the message is one sentence."""
