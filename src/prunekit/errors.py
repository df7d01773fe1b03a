"""User-facing errors.

Everything a user can get wrong (a bad flag, a missing file, an unsupported model) raises
`PrunekitError` with one line that names the bad value and what is accepted. The CLI prints it as
`error: <message>` and exits with status 2; nothing deep inside torch reaches the user.
"""


class PrunekitError(Exception):
    """A bad input or an unsupported case, explained in one line."""
