"""A folder of images: ``data.source: folder``, ``data.path: DIR``.

* ``DIR/<class>/...`` becomes class-labelled data, classes in sorted order (or the order of
  ``data.class_names``); a ``DIR`` with image files and no sub-folders is unlabelled.
* A file is taken if its name has an extension Pillow knows (any case) or none; it is
  decoded by its content, so a JPEG named ``.png`` is fine. Hidden files and folders
  (``.DS_Store``, ``.ipynb_checkpoints``) and other files (``labels.csv``) are skipped.
* Each image is EXIF-rotated; 16-bit grayscale is scaled to 8 bits; CMYK becomes RGB;
  transparency (RGBA, LA, P or L/RGB with a transparent colour) is composited on
  ``data.background``; then it is converted to L or RGB for the VAE, its short side resized
  and its centre cropped to ``data.image_size`` (smaller images are scaled up). An image under
  half that size, or beyond 4:1, is a bad file (``misshapen``): blown up or cropped it would
  be something else than the data.
* A file that cannot be used (empty, not an image, truncated, larger than Pillow's
  decompression-bomb limit, unreadable, a broken link) stops the run with one line naming
  it. With ``data.skip_bad_images: true`` it is skipped and counted instead, and the run
  stops only if more than ``data.max_bad_fraction`` of the files are bad.

Decoding happens in ``__getitem__``, which never raises for a bad file: it returns a blank
image and the reason, so DataLoader workers can decode in parallel and the caller decides.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, printable

__all__ = ["FolderDataset", "load_image", "misshapen"]

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
_NOT_IMAGES = {
    ".txt",
    ".csv",
    ".json",
    ".md",
    ".yaml",
    ".yml",
    ".xml",
    ".py",
    ".ipynb",
    ".zip",
    ".tar",
    ".gz",
    ".npz",
    ".npy",
    ".pt",
    ".safetensors",
    ".pdf",
}


class BadImage(Exception):
    pass


def _image_extensions() -> set:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def misshapen(h: int, w: int, size: int) -> str:
    """Why an h x w image would not make a size x size training image, or "": under half the
    size on its short side (an 8x8 icon blown up to 32x32), or beyond 4:1 (the square centre
    crop would drop most of it). Arrays and image files follow this one rule."""
    if min(h, w) * 2 < size:
        return f"{h}x{w} pixels, under half of data.image_size={size}"
    if max(h, w) > 4 * min(h, w):
        return f"{h}x{w} pixels: a square centre crop would keep only {min(h, w) / max(h, w):.0%} of it"
    return ""


def load_image(path: Path, size: int, channels: int, background: str = "white") -> np.ndarray:
    """Decode ``path`` to uint8 (size, size, channels); raises ``BadImage`` with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise BadImage("it is an empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"it is too large to decode safely ({str(exc).split('.')[0]})") from None
    except UnidentifiedImageError:
        raise BadImage("it is not an image Pillow can read (text or HTML saved under an image name?)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated data, unreadable file
        raise BadImage(
            f"it is damaged or unreadable ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None

    why = misshapen(img.height, img.width, size)
    if why:
        raise BadImage(f"it is {why}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale -> 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).round().astype(np.uint8))
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    transparent = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if transparent:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUNDS[background] + (255,))
        img = Image.alpha_composite(canvas, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    img = ImageOps.fit(img, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))  # crop the centre, resize
    array = np.array(img, dtype=np.uint8)  # a writable copy
    return array[..., None] if array.ndim == 2 else array


class FolderDataset(Dataset):
    """Image files of a folder, decoded on access; items are (image in [-1, 1] (C, S, S),
    label, index, reason) with reason "" for a good file."""

    subset = None  # what data.max_items kept, in words

    @property
    def notes(self) -> List[str]:
        """What the run should say about the folder: files passed over by their extension, and
        what transparent pixels are laid on."""
        lines = []
        if self.ignored:
            lines.append(
                f"{self.root}: {len(self.ignored)} file(s) skipped as not images by their extension "
                f"(e.g. {printable(self.ignored[0].relative_to(self.root))})"
            )
        lines.append(f"transparent pixels, where images have them, are laid on {self.background} (data.background)")
        return lines

    def __init__(
        self,
        root: Path,
        image_size: int,
        channels: int,
        background: str = "white",
        class_names: Optional[List[str]] = None,
    ):
        self.root, self.image_size, self.channels, self.background = Path(root), image_size, channels, background
        self.origin = str(root)
        self.files, labels, self.class_names, self.ignored = self._scan(class_names)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.class_names)

    def _scan(self, wanted: Optional[List[str]]):
        root = self.root
        if not root.exists():
            raise DataError(f"image folder {root} not found; check data.path")
        if not root.is_dir():
            raise DataError(f"data.path {root} is a file; give the folder that holds the images")
        visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        folders = [p for p in visible if p.is_dir()]
        if wanted is not None:
            missing = [c for c in wanted if not (root / c).is_dir()]
            if missing:
                raise DataError(f"{root}: data.class_names lists {missing[0]!r}, which is not a folder there")
            folders = [root / c for c in wanted]
        exts = _image_extensions()
        files, labels, ignored = [], [], []

        def collect(folder: Path, label: int) -> int:
            found = 0
            seen = set()  # folders by (device, inode): a link back up is walked once, never in a loop
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in seen:
                    dirnames[:] = []
                    continue
                seen.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    path = Path(dirpath) / name
                    suffix = path.suffix.lower()
                    if name.startswith("."):
                        continue
                    if suffix in _NOT_IMAGES or (suffix and suffix not in exts):
                        ignored.append(path)
                        continue
                    if not path.is_file() and path.exists():  # a FIFO or socket: never open it
                        ignored.append(path)
                        continue
                    files.append(path)  # includes broken links: reported as bad when read
                    labels.append(label)
                    found += 1
            return found

        if folders:
            loose = [p for p in visible if p.is_file() and p.suffix.lower() in exts]
            if loose and wanted is None:
                raise DataError(
                    f"{root} has class folders and also images directly in it ({loose[0].name}, ...); "
                    "move them into a class folder, or point data.path at a folder of one kind"
                )
            for label, folder in enumerate(folders):
                if collect(folder, label) == 0:
                    raise DataError(f"class folder {folder} has no images; add some or remove the folder")
            names = [f.name for f in folders]
        else:
            collect(root, 0)
            names = []
        if not files:
            raise DataError(f"{root} holds no image files (hidden and non-image files are skipped); check data.path")
        return files, labels, names, ignored

    def in_colour(self, sample: int = 16) -> bool:
        """Whether the folder's images carry colour: some of the first ``sample`` readable ones
        have channels that differ (a grey image saved as RGB does not count)."""
        from PIL import Image

        for path in self.files[:sample]:
            try:
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
            except Exception:
                continue
            if np.abs(rgb[..., 0] - rgb[..., 1]).max() > 8 or np.abs(rgb[..., 1] - rgb[..., 2]).max() > 8:
                return True
        return False

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int, str]:
        try:
            array = load_image(self.files[i], self.image_size, self.channels, self.background)
            reason = ""
        except BadImage as exc:
            array = np.zeros((self.image_size, self.image_size, self.channels), np.uint8)
            reason = str(exc)
        except Exception as exc:
            array = np.zeros((self.image_size, self.image_size, self.channels), np.uint8)
            reason = f"it cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})"
        x = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0  # (C, S, S) in [-1, 1]
        return x, self.labels[i], i, reason

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def fingerprint(self) -> str:
        """Paths, sizes, modification times, labels and the preprocessing: a change to any
        file or setting gives a new fingerprint without decoding anything."""
        h = hashlib.sha256(f"{self.image_size}|{self.channels}|{self.background}|{self.class_names}".encode())
        for path, label in zip(self.files, self.labels.tolist()):
            try:
                st = path.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(os.fsencode(path.relative_to(self.root)) + f"|{stamp}|{label}\n".encode())
        return h.hexdigest()[:16]
