"""Write glowtrain/assets/digits.npz, the bundled 8x8 handwritten digits.

Source: the UCI ML hand-written digits data set ("Optical Recognition of Handwritten Digits",
E. Alpaydin and C. Kaynak, 1998, https://archive.ics.uci.edu/dataset/80), licensed CC BY 4.0,
as shipped by scikit-learn in ``sklearn.datasets.load_digits``: 1,797 images of 8x8 pixels with
values 0..16 and labels 0..9.

The asset holds ``images`` uint8 (1797, 8, 8) = round(value * 255 / 16) and ``labels`` uint8
(1797,), saved with ``np.savez_compressed``. scikit-learn is needed only to run this script once,
not at run time, e.g.::

    pip install --target /tmp/skl scikit-learn
    PYTHONPATH=/tmp/skl python scripts/make_digits_asset.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "glowtrain" / "assets" / "digits.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from sklearn.datasets import load_digits  # only this script needs scikit-learn

    digits = load_digits()
    values = np.asarray(digits.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    assert values.shape == (1797, 8, 8) and values.min() >= 0 and values.max() <= 16
    images = np.rint(values * 255.0 / 16.0).astype(np.uint8)
    labels = np.asarray(digits.target).astype(np.uint8)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): images {images.shape}, "
          f"labels {labels.shape}")


if __name__ == "__main__":
    main()
