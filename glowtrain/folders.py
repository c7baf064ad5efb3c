"""Image folders: finding the files, checking every one before training, the stable split, and a fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from glowtrain.errors import MissingData, UserError
from glowtrain.files import read_json

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# struct.error: what a malformed EXIF block raises when the image is turned upright by it.
PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
SPLIT_SCHEME = "path-hash-1"  # recorded with a run: which rule put each file into train or test
EXIF_ORIENTATION = 0x0112  # the EXIF tag phones write instead of turning the pixels
# Greyscale wider than 8 bits: Pillow opens 16-bit PNGs (and PGM, TIFF) in these modes. Mode "I" (32-bit
# integers) is how older Pillow, and some TIFFs, hold 16-bit greyscale, so it is read on the same 0..65535 scale.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GREY_MODES = {"1", "L", "LA", *WIDE_GREY_MODES}


def find_images(root: str, ignored: list[str] | None = None) -> tuple[Path, list[str]]:
    """(the absolute root, every image file under it) in a sorted order that is the same on every machine;
    what else is there (hidden folders, with a trailing separator, and files hidden or without an image
    extension) is added to `ignored`."""
    base = _image_folder(root)
    found = sorted(each_file_once(_walk(base, ignored if ignored is not None else [])),
                   key=functools.partial(relative, base=base))
    if not found:
        raise MissingData(f"no images under {base}", f"data.root needs files ending in "
                          f"{', '.join(IMAGE_EXTENSIONS)} (any case, any depth)")
    return base, found


def _walk(base: Path, ignored: list[str]) -> list[str]:
    """Every image file under base (the rest goes to `ignored`): first the real ones, then what links add,
    each group in name order. Links to folders are followed, but each real folder is entered once (a link
    back up, `loop -> .`, or a second link to a folder adds nothing); listed first, a file's own path wins
    over a link's (its name decides its split, so adding a link must not rename it)."""
    seen, links, linked_files, through_links = {_identity(base)}, [], [], []
    real = list(_walk_real(base, seen, links, linked_files, ignored))
    while links:  # folders reached only through links, each walked the same way
        folder = links.pop(0)
        identity = _identity(folder)
        if identity is not None and identity not in seen:
            seen.add(identity)
            through_links += _walk_real(folder, seen, links, linked_files, ignored)
    by_name = functools.partial(relative, base=base)
    return sorted(real, key=by_name) + sorted(through_links, key=by_name) + sorted(linked_files, key=by_name)


def _walk_real(top: str | Path, seen: set, links: list[str], linked_files: list[str],
               ignored: list[str]) -> Iterator[str]:
    """The image files under top reached without links; links to folders and to files are set aside in
    `links` and `linked_files`, hidden folders and other files in `ignored`."""
    for dirpath, dirnames, filenames in os.walk(top):
        entered = []
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):  # .git, .thumbs, .ipynb_checkpoints: not entered, but said
                ignored.append(path + os.sep)
            elif is_prepared_cache(path):  # glowtrain prepare's own output (by default inside data.root)
                continue
            elif os.path.islink(path):
                links.append(path)
            elif (identity := _identity(path)) is not None and identity not in seen:
                seen.add(identity)
                entered.append(name)
        dirnames[:] = entered
        # Hidden files include macOS "._x.jpg" resource forks, which are not images.
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                ignored.append(path)
            elif os.path.islink(path):
                linked_files.append(path)
            else:
                yield path


def is_prepared_cache(folder: str | Path) -> bool:
    """Whether `folder` is a cache `glowtrain prepare` wrote: its index.json is written last, once complete."""
    return prepared_index(folder) is not None


def prepared_index(folder: str | Path) -> dict | None:
    """The index.json of the cache `glowtrain prepare` wrote in `folder`, or None where there is none."""
    index = Path(folder) / "index.json"
    if not index.is_file():
        return None
    try:
        fields = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # What every cache's index has held; later ones add fingerprints, reports and keys, which loading does not need.
    complete = isinstance(fields, dict) and {"format", "dataset", "splits", "image_shape"} <= fields.keys()
    return fields if complete else None


def ignored_counts(ignored: list[str]) -> tuple[int, int]:
    """(hidden folders, other files) among what find_images left out."""
    folders = sum(path.endswith(os.sep) for path in ignored)
    return folders, len(ignored) - folders


def describe_ignored(folders: int, files: int) -> str:
    """What a data line says of the folders and files that are not read (empty when there are none)."""
    parts = [f"{folders:,} hidden folder{'s' * (folders != 1)}"] * bool(folders)
    parts += [f"{files:,} file{'s' * (files != 1)} hidden or not {'/'.join(IMAGE_EXTENSIONS)}"] * bool(files)
    return f" (not read: {', '.join(parts)})" if parts else ""


def _identity(path: str | Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)  # follows links: the real file or folder
    except OSError:  # a broken link; a file gone since it was listed is found unreadable later
        return None
    return stat.st_dev, stat.st_ino


def each_file_once(paths) -> list[str]:
    """The first path of each real file, in the order given (one reached twice through links, or hard-linked,
    is one image: it must not land in both splits)."""
    seen, once = set(), []
    for path in paths:
        identity = _identity(path)
        if identity in seen:
            continue
        if identity is not None:
            seen.add(identity)
        once.append(path)
    return once


def relative(path: str, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()


def name_bytes(text: str) -> bytes:
    """A file name's own bytes: UTF-8, and a name that is not UTF-8 (b"caf\xe9.png", which Python holds as
    surrogates) back as the bytes on disk. The same bytes as str.encode() for every valid name."""
    return text.encode("utf-8", "surrogateescape")


def _position(relpath: str, split_seed: int) -> float:
    """Where a file falls in [0, 1): a hash of its own relative path, so other files never move it."""
    digest = hashlib.sha256(name_bytes(f"{split_seed}\0{relpath}")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_paths(paths: list[str], base: Path, test_fraction: float, split_seed: int, split: str) -> list[str]:
    """The files of one split: a file is in test when its path hash falls below test_fraction.

    Adding or removing files never moves another file between the splits. A tiny folder whose hashes
    all fall on one side gives the other side its nearest file, so neither split is empty."""
    if len(paths) < 2:
        raise UserError(f"found only {len(paths)} image under {base}; a train and a test split need at least 2")
    positions = [_position(relative(p, base), split_seed) for p in paths]
    in_test = [x < test_fraction for x in positions]
    if not any(in_test):
        in_test[positions.index(min(positions))] = True
    if all(in_test):
        in_test[positions.index(max(positions))] = False
    return [p for p, test in zip(paths, in_test) if test == (split == "test")]


def fingerprint(paths: list[str], base: Path) -> dict:
    """The number of files and a digest of their relative names and sizes: changes when the data does."""
    digest = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path) if os.path.exists(path) else -1  # -1: gone since the folder was listed
        digest.update(name_bytes(f"{relative(path, base)}\t{size}\n"))
    return {"n_images": len(paths), "digest": digest.hexdigest()[:16]}


def fingerprint_differs(recorded: dict | None, current: dict | None) -> bool:
    if not recorded or not current:
        return False
    digests = (recorded.get("digest"), current.get("digest"))
    return recorded.get("n_images") != current.get("n_images") or (None not in digests and digests[0] != digests[1])


@dataclass
class Checked:
    """What checking a list of files found: the readable ones, the unreadable ones and the conversions."""

    good: list[str]
    bad: list[tuple[str, str]]  # (path, reason)
    conversions: Counter = field(default_factory=Counter)
    records: dict = field(default_factory=dict)  # relative path -> [size, mtime_ns, mode, width, height, error]


def _header(path: str) -> list:
    """[size, mtime_ns, mode, width, height, why it cannot be read (None), conversions the header shows]."""
    try:
        stat = os.stat(path)
    except OSError as e:  # gone or unreadable since the folder was listed
        return [0, 0, None, 0, 0, e.strerror or type(e).__name__, []]
    try:
        with Image.open(path) as img:
            return [stat.st_size, stat.st_mtime_ns, img.mode, img.width, img.height, unsupported_mode(img.mode),
                    header_conversions(img)]
    except PIL_DECODE_ERRORS as e:
        return [stat.st_size, stat.st_mtime_ns, None, 0, 0, str(e) or type(e).__name__, []]


def header_conversions(img: Image.Image) -> list[str]:
    """What reading the file does that its mode and size do not show: 16-bit colour, which Pillow opens as 8-bit
    RGB (each channel's high byte). (An EXIF turn is found by the decode: a PNG's EXIF may follow its pixels.)"""
    rawmode = img.tile[0][3] if img.tile else None  # by index: Pillow before 11 has plain tuples
    wide = img.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and rawmode.endswith(";16B")
    return ["16-bit→8-bit"] if wide else []


def unsupported_mode(mode: str) -> str | None:
    """Why images of this Pillow mode cannot be read as pixels 0..255 (None: they can)."""
    if mode == "F":  # floats may span 0..1, 0..255 or anything: no conversion would be right for all
        return ("32-bit float pixels (mode F), whose range glowtrain cannot know; save the image as an 8- or "
                "16-bit PNG")
    return None


def _decoded(path: str, record: list) -> list:
    try:
        with Image.open(path) as img:
            img.load()
            turned = img.getexif().get(EXIF_ORIENTATION) in range(2, 9)  # the turns read_image applies
            if turned:
                ImageOps.exif_transpose(img)  # a malformed EXIF block fails here, not in the middle of training
    except PIL_DECODE_ERRORS as e:
        return [*record[:5], str(e) or type(e).__name__, record[6]]
    return [*record[:6], record[6] + ["turned upright (EXIF)"]] if turned else record


def _is_current(record, path: str) -> bool:
    if not isinstance(record, list) or len(record) != 7:  # a record of an earlier glowtrain: read the file again
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return record[0] == stat.st_size and record[1] == stat.st_mtime_ns


def check_images(paths: list[str], base: Path, channels: int, image_size: int, crop: int | None,
                 previous: dict | None = None) -> Checked:
    """Open every file's header, then decode the files whose headers were read (in threads: PIL decodes
    without the GIL). Files with a current entry in `previous` (same size and mtime) are not read again."""
    previous = previous or {}
    records = {relative(p, base): previous.get(relative(p, base)) for p in paths}
    todo = [p for p in paths if not _is_current(records[relative(p, base)], p)]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        headers = list(pool.map(_header, todo))
        readable = [(p, r) for p, r in zip(todo, headers) if r[5] is None]
        decoded = dict(zip([p for p, _ in readable], pool.map(_decoded, *zip(*readable)) if readable else []))
    for path, header in zip(todo, headers):
        records[relative(path, base)] = decoded.get(path, header)
    checked = Checked([], [], Counter(), records)
    for path in paths:
        size, mtime, mode, width, height, error, from_header = records[relative(path, base)]
        if error is not None:
            checked.bad.append((path, error))
            continue
        checked.good.append(path)
        checked.conversions.update(from_header + conversions(mode, width, height, channels, image_size, crop))
    return checked


def opened_image_conversions(img: Image.Image, header: list[str], channels: int, image_size: int,
                             crop: int | None) -> list[str]:
    """check_images's words for an image opened and loaded here: `header` (header_conversions of it before the
    load, which empties its tiles), an EXIF turn (found after it: a PNG's EXIF may follow its pixels), then
    `conversions`."""
    turned = ["turned upright (EXIF)"] if img.getexif().get(EXIF_ORIENTATION) in range(2, 9) else []
    return header + turned + conversions(img.mode, img.width, img.height, channels, image_size, crop)


def conversions(mode: str, width: int, height: int, channels: int, image_size: int, crop: int | None) -> list[str]:
    """What turning an image of this mode and size into the training shape does to it, in words."""
    done = []
    if mode in WIDE_GREY_MODES and mode != "I":  # "I" may hold 8-bit values: the header cannot tell
        done.append("16-bit→8-bit")
    if channels == 3 and mode in _GREY_MODES:
        done.append("grey→RGB")
    if channels == 1 and mode not in _GREY_MODES:
        done.append("colour→grey")
    if "A" in mode or mode == "PA":
        done.append("alpha dropped")
    if mode in ("P", "PA") and channels == 3:
        done.append("palette→RGB")
    if mode == "CMYK" and channels == 3:
        done.append("CMYK→RGB")
    side = min(width, height) if crop is None else min(crop, width, height)
    if (width, height) != (side, side):
        done.append("centre-cropped" if crop is None else f"centre-cropped to {side}x{side}")
    if side != image_size:
        done.append("resized")
    return done


def unreadable_error(bad: list[tuple[str, str]], base: Path) -> UserError:
    """One line naming the first unreadable file, how many there are, and the two ways on."""
    path, reason = bad[0]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return UserError(f"cannot read image {path} ({reason}){more} under {base}; fix or remove it, "
                     "or set data.on_bad_image: skip")


def refuse_output_among_images(out: Path, image_folder: str | Path, whose: str) -> None:
    """Refuse to write pictures into a folder of images that is read recursively (outside its hidden folders):
    they would be read as images of `whose` next time (e.g. "the image folder X", "the images this run trains on")."""
    folder = Path(image_folder).expanduser()
    if not folder.is_dir():
        return
    # Resolved (links, ..) on both sides, as the folder walk itself sees them.
    resolved_out, resolved_folder = Path(out).expanduser().resolve(), folder.resolve()
    if resolved_out.is_relative_to(resolved_folder) and not any(
            part.startswith(".") for part in resolved_out.relative_to(resolved_folder).parts):
        raise UserError(f"the output folder {out} lies inside {whose} ({image_folder}), where the pictures this "
                        "writes would be read as images next time — choose an --out outside it")


def _image_folder(root: str) -> Path:
    """data.root as an absolute path, refused when it is no folder."""
    base = Path(root).expanduser().absolute()
    if base.exists() and not base.is_dir():
        raise UserError(f"data.root {base} is a file, not a folder; set data.root to the directory holding the images")
    if not base.is_dir():
        raise MissingData(f"image folder {base} does not exist", "set data.root to a directory of images")
    return base


def refuse_missing_image_folder(data_cfg) -> None:
    """A folder dataset's data.root must be a folder: said before the run directory's refusals, which would send a
    user who named a new folder (without --out) to the run of the same name instead."""
    if data_cfg.dataset == "folder" and not data_cfg.cache:
        _image_folder(data_cfg.root)


CELEBA_IMAGES, CELEBA_PARTITION = "img_align_celeba", "list_eval_partition.txt"  # torchvision's layout


def is_celeba_layout(folder: Path) -> bool:
    """`folder` holds CelebA as torchvision lays it out: the aligned faces and the partition file."""
    return (folder / CELEBA_IMAGES).is_dir() and (folder / CELEBA_PARTITION).is_file()


def refuse_output_among_training_images(out: Path, data_cfg) -> None:
    """As refuse_output_among_images, for the image folder a run trains on (data.dataset: folder or celeba, whose
    plain folder is read to any depth): data.root, and the folder a prepared cache was made from (eval --data or a
    new prepare would read pictures written there)."""
    if not data_cfg.reads_image_files:
        return
    official = data_cfg.dataset == "celeba" and is_celeba_layout(Path(data_cfg.root).expanduser() / "celeba")
    # CelebA in torchvision's layout reads only the files its partition list names: nothing written beside them.
    folders = [data_cfg.root] if data_cfg.root.strip() and not official else []  # an empty root names no folder
    if data_cfg.cache:  # the image folder the cache was prepared from, as its index.json records it
        source = (read_json(Path(data_cfg.cache).expanduser() / "index.json") or {}).get("root")
        folders += [source] if isinstance(source, str) else []
    for folder in dict.fromkeys(f for f in folders if f):
        refuse_output_among_images(out, folder, "the image folder this run trains on")
