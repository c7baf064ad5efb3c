"""glowtrain: train Glow normalizing flows on images from the command line."""

__version__ = "0.1.0"

from glowtrain.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__", "load_run"]


def __getattr__(name: str):
    # Imported on first use: `import glowtrain` (and so `glowtrain --help`) stays free of torch.
    if name == "load_run":
        from glowtrain.api import load_run

        return load_run
    raise AttributeError(f"module 'glowtrain' has no attribute {name!r}")
