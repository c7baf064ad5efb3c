"""The one exception type for mistakes a user can fix: bad config, data, paths or checkpoints."""


class UserError(Exception):
    """A one-line message naming the problem and the fix; the CLI maps it to exit code 2."""


class Stopped(Exception):
    """Ctrl-C stopped a command part way: the one line says what it left behind; the CLI exits 130."""
