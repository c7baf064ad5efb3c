"""The one exception type for mistakes a user can fix: bad config, data, paths or checkpoints."""


class UserError(Exception):
    """A one-line message naming the problem and the fix; the CLI maps it to exit code 2."""
