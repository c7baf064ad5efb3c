"""The one exception type for mistakes a user can fix: bad config, data, paths or checkpoints."""


class UserError(Exception):
    """A one-line message naming the problem and the fix; the CLI maps it to exit code 2."""


class MissingData(UserError):
    """The data a config names is not where it says. `fit` and `prepare` are fixed in the config (the message's
    own fix); a command on a trained run is fixed with --data (for_run)."""

    def __init__(self, problem: str, config_fix: str):
        super().__init__(f"{problem} — {config_fix}")
        self.problem, self.config_fix = problem, config_fix

    def __reduce__(self):  # pickled across processes (data workers, ranks) with both parts, not the joined line
        return type(self), (self.problem, self.config_fix)

    def for_run(self) -> str:
        return (f"{self.problem} — pass --data DIR: where the run's data is on this machine (its image folder, "
                "dataset root or prepared cache)")


class Stopped(Exception):
    """Ctrl-C stopped a command part way: the one line says what it left behind; the CLI exits 130."""
