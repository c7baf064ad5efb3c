"""How commands end early: the exception for mistakes a user can fix (bad config, data, paths or checkpoints),
the one for a stop part way, and the signals that ask for a stop."""

import signal

# Signals that ask a command to stop: Ctrl-C, a scheduler's or torchrun's SIGTERM, and the SIGHUP of a closed
# terminal or ssh session. A command ends on them as on Ctrl-C (its clean-ups run, it says `interrupted`); the
# trainer takes them over while it trains, to save first; data workers ignore them.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


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


def nohup(sig: int) -> bool:
    """Whether `sig` is a SIGHUP this process was started to ignore (`nohup`): it stays ignored. (A shell also
    starts background jobs ignoring SIGINT, but `kill -INT` to a run has always saved and stopped it.)"""
    return sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) == signal.SIG_IGN
