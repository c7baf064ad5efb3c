"""glowtrain: train Glow normalizing flows on images from the command line."""

__version__ = "0.1.0"

from glowtrain.errors import UserError  # noqa: E402

__all__ = ["Glow", "UserError", "__version__", "load_run"]


def __getattr__(name: str):
    # Imported on first use: `import glowtrain` (and so `glowtrain --help`) stays free of torch.
    if name == "load_run":
        from glowtrain.api import load_run

        return load_run
    if name == "Glow":
        from glowtrain.model import Glow

        return Glow
    raise AttributeError(f"module 'glowtrain' has no attribute {name!r}")
