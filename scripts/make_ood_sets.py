"""Write the four out-of-distribution image folders of README's "Out-of-distribution detection" section.

From the bundled digits test split (297 8x8 greyscale images): uniform noise, inverted digits, constant
images and digits shifted 2 pixels right, each as a folder of PNGs under --out:

    python scripts/make_ood_sets.py --out ood-sets
    glowtrain score --run runs/digits --dataset digits --against ood-sets/noise
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from glowtrain.config import load_config
from glowtrain.data import build_dataset


def ood_sets(digits: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 (N, H, W) arrays, one per out-of-distribution set, each as many images as `digits`."""
    rng = np.random.default_rng(seed)
    n, height, width = digits.shape
    shifted = np.zeros_like(digits)
    shifted[:, :, 2:] = digits[:, :, :-2]  # 2 pixels to the right, the uncovered columns black
    return {
        "noise": rng.integers(0, 256, size=digits.shape, dtype=np.uint8),
        "inverted": 255 - digits,
        "constant": np.broadcast_to(rng.integers(0, 256, size=(n, 1, 1), dtype=np.uint8), digits.shape).copy(),
        "shifted": shifted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ood-sets", help="folder to write noise/, inverted/, constant/, shifted/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the constant levels")
    args = parser.parse_args()
    test = build_dataset(load_config().data, "test")  # the bundled digits
    digits = test.images[:, 0].numpy()
    for name, images in ood_sets(digits, args.seed).items():
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            Image.fromarray(image, "L").save(folder / f"{index:04d}.png")
        print(f"{folder}: {len(images)} images")


if __name__ == "__main__":
    main()
