"""glowtrain: train Glow normalizing flows on images from the command line."""

__version__ = "0.1.0"

from glowtrain.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
