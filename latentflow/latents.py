"""The latent cache: a dataset encoded once by the frozen VAE, in shards.

For every image the cache keeps the posterior mean and standard deviation (VAE space), the
label and the image's index in the dataset (and, with ``data.hflip``, the moments of its
mirror). Training draws a fresh latent from the posterior at every step,
``z = mean + std * eps`` (what ``latent_dist.sample()`` does), instead of freezing one
sample. Rows are keyed by dataset index, so no order of reading can pair a latent with
another image's label.

Layout: ``<cache_dir>/latents-<key>/``, where ``key`` hashes what the cache is made from
(VAE identity, latent normalisation, image shape, dataset fingerprint, hflip, storage dtype,
shard size, format)::

    manifest.json               that metadata and the shard plan
    shard_00000.safetensors     ``moments`` (n, 2 or 4, c, h, w) in ``vae.cache_dtype``,
                                ``labels`` (n,), ``indices`` (n,)
    shard_00000.done            its completion marker: rows, and the bad files it skipped

**Encoding** is split over the processes: rank r encodes the unfinished shards r, r + W, ...
and writes each atomically, then its marker. (Shards and markers are the one place where
processes other than the main one write files: each writes only its own.) An interrupted
encode resumes at the unfinished shards. Ranks wait for each other by watching the markers,
not in a collective, so no collective timeout limits how long encoding may take; a rank
that fails leaves an error marker, and every rank stops with its message.

**Reading** is memory-mapped (numpy over the safetensors data), so resident memory does not
grow with the dataset: a step gathers its rows from the mapped shards in one pass per shard,
and drops the pages it mapped right after (they stay in the page cache, shared by the ranks). A shard
that cannot be read, or whose rows no longer match the dataset, is encoded again, with a
message saying why.

``LatentBatches`` turns the cache into training batches: a seeded permutation per epoch,
cut into global batches of ``processes x batch_size`` that each rank slices, so a step's
batch is a pure function of (seed, epoch, iteration, rank). Resuming mid-epoch is starting
the loop at an iteration; nothing else needs restoring.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from .bounded import BoundsError, read_json
from .console import Console
from .data import bad_file_error, bad_file_policy, build_dataset, check_channels
from .distributed import on_main
from .errors import DataError, LatentflowError, Stopped
from .faults import Faults
from .files import FIX_CACHE, atomic_file, remove_stale_temps, write_text_atomic
from .rng import STREAM_DATA, STREAM_FLIP, STREAM_VALID, derive_seed
from .vae import FrozenVAE

__all__ = [
    "CACHE_DTYPES",
    "LatentBatches",
    "LatentCache",
    "cache_metadata",
    "default_cache_dir",
    "encode_items",
    "load_or_build_cache",
    "vae_and_data",
]

CACHE_FORMAT = "2"
# name -> (torch dtype, numpy dtype the bytes are mapped as, safetensors dtype)
FOLIO = 2 << 20  # the largest page-cache folio a read fault maps (a PMD); rows are unmapped in these
CACHE_DTYPES = {
    "float32": (torch.float32, np.float32, "F32"),
    "bfloat16": (torch.bfloat16, np.int16, "BF16"),
    "float16": (torch.float16, np.float16, "F16"),
}


def default_cache_dir() -> Path:
    """$LATENTFLOW_CACHE, else ~/.cache/latentflow (shared by all runs, like the HF cache)."""
    return Path(os.environ.get("LATENTFLOW_CACHE", Path.home() / ".cache" / "latentflow")).expanduser()


# --- reading -------------------------------------------------------------------------------


class Shard:
    """One shard file: ``moments`` memory-mapped, labels and indices in memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 1 << 24:
                raise ValueError("implausible safetensors header")
            header = read_json(f.read(header_len).decode("utf-8"), "latent cache shard header", max_bytes=1 << 24)
        base = 8 + header_len
        info = header["moments"]
        np_dtype = {v[2]: v[1] for v in CACHE_DTYPES.values()}[info["dtype"]]
        self.torch_dtype = {v[2]: v[0] for v in CACHE_DTYPES.values()}[info["dtype"]]
        self.shape = tuple(info["shape"])  # (n, K, c, h, w)
        start, stop = info["data_offsets"]
        expected = int(np.prod(self.shape)) * np.dtype(np_dtype).itemsize
        if stop - start != expected or os.path.getsize(self.path) < base + stop:
            raise ValueError("the file is shorter than its header says")
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # rows are read in random order: no readahead around each
            self._map.madvise(mmap.MADV_RANDOM)
        self.moments = np.ndarray(self.shape, dtype=np_dtype, buffer=self._map, offset=base + start)
        self._data_start, self._row_bytes = base + start, expected // max(1, self.shape[0])

        def small(name):
            i = header[name]
            a, b = i["data_offsets"]
            return torch.from_numpy(
                np.frombuffer(self._map, dtype=np.int64, count=(b - a) // 8, offset=base + a).copy()
            )

        self.labels, self.indices = small("labels"), small("indices")
        if len(self.labels) != self.shape[0] or len(self.indices) != self.shape[0]:
            raise ValueError("labels, indices and moments disagree in length")

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, local: np.ndarray) -> torch.Tensor:
        """Moments of rows ``local`` as float32 (k, K, c, h, w): reads only their pages, then
        unmaps what the reads mapped. A fault can map the whole page-cache folio around a
        row (up to 2 MB on current kernels), so without this a process's resident memory
        would grow toward the size of the cache; the pages stay in the page cache, shared
        by the ranks."""
        out = torch.from_numpy(np.ascontiguousarray(self.moments[local]))
        if hasattr(mmap, "MADV_DONTNEED"):
            starts = self._data_start + np.asarray(local, np.int64) * self._row_bytes
            for chunk in np.unique(starts // FOLIO):
                offset = int(chunk) * FOLIO
                self._map.madvise(mmap.MADV_DONTNEED, offset, min(2 * FOLIO, len(self._map) - offset))
        return out.view(self.torch_dtype).float() if self.torch_dtype != torch.float32 else out

    def release(self) -> None:
        """Drop this process's mapping of every page of the shard (the kernel keeps them cached)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


class LatentCache:
    """All rows of a cache, in dataset order: moments (read through memory maps), labels
    (N,) and dataset indices (N,). Rows of bad files skipped while encoding are absent."""

    def __init__(self, shards: Sequence[Shard], root: Optional[Path] = None):
        self.shards, self.root = list(shards), root
        self.labels = torch.cat([s.labels for s in self.shards])
        self.indices = torch.cat([s.indices for s in self.shards])
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # first row of each shard
        self.has_flips = self.shards[0].shape[1] == 4
        self.bad_files: List[Tuple[str, str]] = []

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(self.shards[0].shape[2:])

    def moments(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, K, c, h, w) float32 moments of rows ``idx``: one read per shard touched."""
        idx_np = idx.numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        shard_of = np.searchsorted(self.offsets, idx_np, side="right") - 1
        out = torch.empty((len(idx_np), *self.shards[0].shape[1:]), dtype=torch.float32)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            out[torch.from_numpy(where)] = self.shards[s].rows(idx_np[where] - self.offsets[s])
        return out

    def gather(self, idx: torch.Tensor, flip: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        """Moments (B, c, h, w) x 2 and labels (B,) of rows ``idx`` (B,); where ``flip`` (B,)
        is true, the mirrored image's moments."""
        m = self.moments(idx)  # (B, K, c, h, w): mean, std[, mean of the mirror, its std]
        mean, std = m[:, 0], m[:, 1]
        if flip is not None and flip.any():
            f = flip.view(-1, 1, 1, 1)
            mean, std = torch.where(f, m[:, 2], mean), torch.where(f, m[:, 3], std)
        return mean, std, self.labels[idx]

    # Whole-cache views, for inspection and tests (they read every row).
    def _all(self, k: int) -> torch.Tensor:
        return self.moments(torch.arange(len(self)))[:, k]

    @property
    def mean(self) -> torch.Tensor:
        return self._all(0)

    @property
    def std(self) -> torch.Tensor:
        return self._all(1)

    @property
    def mean_flip(self) -> torch.Tensor:
        return self._all(2)

    @property
    def std_flip(self) -> torch.Tensor:
        return self._all(3)


# --- what a cache is made from --------------------------------------------------------------


def cache_metadata(
    vae: FrozenVAE, dataset, hflip: bool = False, dtype: str = "float32", shard_size: int = 4096
) -> Dict[str, str]:
    """Two caches with equal metadata hold the same latents."""
    return {
        "format": CACHE_FORMAT,
        "vae": vae.identity.rsplit("@", 1)[-1],
        "scale": json.dumps(vae.scale(torch.zeros(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "unit": json.dumps(vae.scale(torch.ones(1, vae.latent_channels, 1, 1)).flatten().tolist()),
        "image_shape": json.dumps(list(dataset.image_shape)),
        "dataset": dataset.fingerprint(),
        "num_items": str(len(dataset)),
        "hflip": str(bool(hflip)),
        "dtype": dtype,
        "shard_size": str(shard_size),
    }


# --- encoding -------------------------------------------------------------------------------


def vae_and_data(cfg, device, console: Optional[Console] = None):
    """The frozen VAE of experiment ``cfg`` and the dataset it encodes, saying on ``console``
    (the main process's) what happens to the images' channels, which subset ``data.max_items``
    kept and what a folder's notes are; colour images for a 1-channel VAE are refused unless
    ``data.convert_to_gray``. Shared by training and ``encode``, so both take the same data."""
    vae = FrozenVAE.from_pretrained(cfg.vae.pretrained, cfg.vae.subfolder).to(device)
    channels = check_channels(cfg.data, vae.in_channels, cfg.vae.pretrained)
    dataset = build_dataset(cfg.data, channels=vae.in_channels)
    notes = getattr(dataset, "notes", [])  # an image folder's: files skipped by extension, the background
    for line in (channels, dataset.subset and f"data.max_items: {dataset.subset}", *notes):
        if line and console is not None:
            console.line(line)
    return vae, dataset


@torch.no_grad()
def encode_items(
    vae: FrozenVAE,
    dataset,
    items: Sequence[int],
    batch_size: int = 256,
    hflip: bool = False,
    skip_bad: bool = False,
    workers: int = 0,
    progress: Optional[Callable] = None,
) -> Tuple[dict, list]:
    """Encode dataset items ``items`` in order (no shuffling, no random augmentation); with
    ``hflip`` their mirrors too. Returns the shard tensors (float32 moments (n, K, c, h, w),
    labels, indices) and the bad files skipped; without ``skip_bad`` the first bad file
    raises a one-line ``DataError``."""
    # An explicit generator: iterating a DataLoader otherwise draws from the global one, and
    # a run would then depend on whether its cache already existed.
    loader = DataLoader(
        Subset(dataset, list(items)),
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator(),
        num_workers=workers,
    )
    moments, labels, indices, bad = [], [], [], []
    for batch in progress(loader) if progress else loader:
        images, y, idx = batch[:3]
        reasons = batch[3] if len(batch) > 3 else [""] * len(idx)
        good = torch.tensor([not r for r in reasons], dtype=torch.bool)
        for i, reason in zip(idx.tolist(), reasons):
            if reason:
                if not skip_bad:
                    raise bad_file_error(str(dataset.files[i]), reason)
                bad.append((str(dataset.files[i]), reason))
        if not good.all():
            images, y, idx = images[good], y[good], idx[good]
        if len(idx) == 0:
            continue
        try:
            parts = list(vae.encode(images))  # mean, std: (B, c, h, w) each
            if hflip:
                parts += list(vae.encode(images.flip(-1)))  # the mirror image, encoded as itself
        except (RuntimeError, MemoryError) as exc:
            if not isinstance(exc, MemoryError) and "out of memory" not in str(exc) and "allocate" not in str(exc):
                raise
            raise DataError(
                f"encoding {tuple(images.shape)} images with VAE {vae.name} ran out of memory; lower "
                "vae.encode_batch_size or data.image_size"
            ) from None
        moments.append(torch.stack([p.cpu() for p in parts], dim=1))  # (B, K, c, h, w)
        labels.append(y)
        indices.append(idx)
    if not moments:
        shape = (0, 4 if hflip else 2, *vae.latent_shape(dataset.image_shape[-1]))
        return {
            "moments": torch.zeros(shape),
            "labels": torch.zeros(0, dtype=torch.long),
            "indices": torch.zeros(0, dtype=torch.long),
        }, bad
    return {
        "moments": torch.cat(moments),
        "labels": torch.cat(labels).long(),
        "indices": torch.cat(indices).long(),
    }, bad


# --- building -------------------------------------------------------------------------------


def _listening(batches, stop: Callable[[], bool]):
    for batch in batches:
        if stop():
            raise Stopped("encoding stopped on request")
        yield batch


def _shard_file(root: Path, i: int) -> Path:
    return root / f"shard_{i:05d}.safetensors"


def _marker(root: Path, i: int) -> Path:
    return root / f"shard_{i:05d}.done"


def _plan(n_items: int, shard_size: int) -> List[Tuple[int, int]]:
    return [(a, min(a + shard_size, n_items)) for a in range(0, n_items, shard_size)]


def _why_unusable(
    root: Path,
    i: int,
    span: Tuple[int, int],
    dataset,
    check_values: bool,
    row_shape: Tuple[int, ...] = (),
    dtype: str = "",
) -> Optional[str]:
    """None if shard ``i`` is complete and matches the dataset; "" if it is simply missing;
    else why it has to be encoded again."""
    if not _marker(root, i).exists():
        return ""
    try:
        marker = read_json(_marker(root, i), "latent cache shard marker")
        shard = Shard(_shard_file(root, i))
    except (OSError, ValueError, KeyError, TypeError, struct.error, BoundsError) as exc:
        return f"it cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    if not isinstance(marker, dict):
        return "its marker is not a latentflow shard marker"
    if len(shard) != marker.get("rows"):
        return f"it holds {len(shard)} rows, its marker says {marker.get('rows')}"
    if row_shape and tuple(shard.shape[1:]) != tuple(row_shape):
        return f"its moments have shape {tuple(shard.shape[1:])}, not {tuple(row_shape)}"
    if dtype and shard.torch_dtype != CACHE_DTYPES[dtype][0]:
        return f"it stores {shard.torch_dtype}, not {dtype}"
    idx = shard.indices
    if len(idx) and (idx.min() < span[0] or idx.max() >= span[1] or not torch.equal(shard.labels, dataset.labels[idx])):
        return "its labels differ from the dataset's"
    if check_values and not np.isfinite(shard.rows(np.arange(len(shard))).numpy()).all():
        return "it holds non-finite moments"
    shard.release()
    return None


def _write_shard(root: Path, i: int, tensors: dict, bad: list, dtype: str, vae: FrozenVAE) -> None:
    m = tensors["moments"]
    if not torch.isfinite(m).all():
        rows = (~torch.isfinite(m.flatten(1))).any(1).nonzero().flatten()
        raise DataError(
            f"VAE {vae.name} encodes {len(rows)} of {len(m)} images of shard {i} to non-finite latents (first: item "
            f"{int(tensors['indices'][rows[0]])}); check the VAE's weights and the images"
        )
    stored = {**tensors, "moments": m.to(CACHE_DTYPES[dtype][0]).contiguous()}
    with atomic_file(
        _shard_file(root, i),
        "latent cache shard",
        needed=sum(t.nbytes for t in stored.values()),
        intact="shards written so far are kept",
        fix=FIX_CACHE,
    ) as tmp:
        save_file(stored, str(tmp))
    write_text_atomic(_marker(root, i), json.dumps({"rows": len(m), "bad": bad}), "latent cache marker", FIX_CACHE)


def _wait_for(root: Path, todo: List[int], build: str, say: Callable, stall_s: float, stop: Callable) -> None:
    """Watch the markers until every shard in ``todo`` is done; stop every rank on another
    rank's error marker, or when no shard has finished for ``stall_s`` seconds."""
    pending, last = set(todo), time.time()
    while pending:
        if stop():
            raise Stopped("encoding stopped on request")
        errors = sorted(root.glob(f".error-{build}-*"))
        if errors:
            raise DataError(errors[0].read_text().strip())
        done = {i for i in pending if _marker(root, i).exists()}
        if done:
            pending -= done
            last = time.time()
            if pending:
                say(f"  latent cache: {len(todo) - len(pending)} of {len(todo)} shards encoded")
        elif time.time() - last > stall_s:
            raise DataError(
                f"no shard of latent cache {root} finished in {stall_s:.0f} s; a process has stalled or "
                "died (its shards are encoded again at the next start)"
            )
        else:
            time.sleep(0.2)


def _report_bad(cache: LatentCache, dataset, cfg, say: Callable) -> None:
    """Apply the bad-file policy to a cache built (or read) with some files skipped."""
    line = bad_file_policy(cache.bad_files, len(dataset), dataset.origin, cfg)
    if line:
        say(line)


def _check_manifest(root: Path, cache_dir: Path, metadata: Dict[str, str], plan, say: Callable) -> None:
    """Start the cache afresh (a new manifest, no shards) unless its manifest matches."""
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise DataError(f"cache directory {cache_dir} is a file; pass --cache-dir DIR (a directory)")
    manifest = root / "manifest.json"
    stored = None
    if manifest.exists():
        try:  # bounded: a damaged or hostile manifest is a mismatch, never a crash
            stored = read_json(manifest, "latent cache manifest")
        except (OSError, ValueError, BoundsError):
            stored = None
        stored = stored.get("metadata") if isinstance(stored, dict) else None
    remove_stale_temps(root)  # shards of encoders that crashed (their pid is gone)
    if stored == metadata:
        return
    if manifest.exists():
        say(f"latent cache {root}: its manifest does not match; encoding it again")
    for old in list(root.glob("shard_*")) + list(root.glob(".error-*")):
        old.unlink()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"could not write latent cache {root} ({exc.strerror}); pass another --cache-dir DIR") from None
    write_text_atomic(
        manifest, json.dumps({"metadata": metadata, "shards": plan}, indent=1), "latent cache manifest", FIX_CACHE
    )


def _shards_to_encode(root: Path, plan, dataset, row_shape, dtype: str, world: int, say: Callable) -> List[int]:
    """The shards that are missing or unusable (their markers removed), said in one line."""
    small = len(dataset) * int(np.prod(row_shape)) * 4 < (1 << 30)
    todo, damaged = [], []
    for i, span in enumerate(plan):
        why = _why_unusable(root, i, span, dataset, small, row_shape, dtype)
        if why is not None:
            todo.append(i)
            if why:
                damaged.append(f"shard {i}: {why}")
                _marker(root, i).unlink(missing_ok=True)
    if damaged:
        say(f"latent cache {root}: encoding {len(damaged)} shard(s) again ({damaged[0]})")
    if len(todo) == len(plan):
        say(f"encoding {len(dataset)} images into {root} ({len(plan)} shard(s), {world} process(es))")
    elif todo:
        say(f"resuming the encode of {root}: {len(plan) - len(todo)} of {len(plan)} shards are done")
    else:
        say(f"using latent cache {root}")
    return todo


def _encode_mine(
    mine: List[int], encode: Callable[[int], None], root: Path, build: str, rank: int, world: int, faults: Faults
) -> None:
    """Encode this rank's shards; a failure is left as an error marker for the others, who are
    watching the markers, before it is raised here."""
    try:
        for n, i in enumerate(mine, start=1):
            encode(i)
            faults.after_shard(n)
    except Stopped:
        raise  # every rank is asked (a signal, a dead launcher): no error marker
    except BaseException as exc:
        if isinstance(exc, LatentflowError):
            exc.local = rank != 0  # only this rank met it: it reports it itself
            message = str(exc)
        else:
            message = f"process {rank} failed while encoding ({type(exc).__name__}: {exc})"
        if world > 1:
            try:
                (root / f".error-{build}-{rank}").write_text(message.replace("\n", " "))
            except OSError:
                pass  # a full disk: the process exits and the launcher ends the others
        raise


def load_or_build_cache(
    vae: FrozenVAE,
    dataset,
    cache_dir: Path,
    accelerator,
    data_cfg=None,
    vae_cfg=None,
    stall_s: float = 3600.0,
    console: Optional[Console] = None,
    faults: Optional[Faults] = None,
    stop: Optional[Callable[[], bool]] = None,
) -> Tuple[LatentCache, Path]:
    """Open the cache of ``dataset`` under ``cache_dir``, encoding whatever is missing first,
    split over the processes. ``data_cfg`` and ``vae_cfg`` (an experiment's sections) bring
    hflip, the bad-file policy, decode workers, the batch size, storage dtype and shard size.
    Any failure (a bad image, a VAE that encodes to NaN, a full or read-only cache directory)
    stops every rank with the same one-line error. ``console`` is told what the encode does
    (pass one on the main process only); ``faults`` is the tests' fault injection; ``stop`` is
    asked between batches, and a yes raises ``Stopped`` (complete shards are kept)."""
    hflip = bool(data_cfg and data_cfg.hflip)
    skip_bad = bool(data_cfg and data_cfg.skip_bad_images)
    dtype = vae_cfg.cache_dtype if vae_cfg else "float32"
    shard_size = vae_cfg.cache_shard_size if vae_cfg else 4096
    batch_size = vae_cfg.encode_batch_size if vae_cfg else 256
    workers = min(data_cfg.decode_workers, os.cpu_count() or 1) if data_cfg and hasattr(dataset, "files") else 0
    metadata = cache_metadata(vae, dataset, hflip, dtype, shard_size)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / f"latents-{key}"
    plan = _plan(len(dataset), shard_size)
    console = console or Console()
    rank, world = accelerator.process_index, accelerator.num_processes
    row_shape = (4 if hflip else 2, *vae.latent_shape(dataset.image_shape[-1]))

    def prepare() -> Tuple[List[int], str]:
        _check_manifest(root, cache_dir, metadata, plan, console.line)
        return _shards_to_encode(root, plan, dataset, row_shape, dtype, world, console.line), uuid.uuid4().hex[:12]

    stop = stop or (lambda: False)

    def encode(i: int) -> None:
        progress = lambda loader: _listening(console.wrap(loader, "encode"), stop)
        tensors, bad = encode_items(vae, dataset, range(*plan[i]), batch_size, hflip, skip_bad, workers, progress)
        _write_shard(root, i, tensors, bad, dtype, vae)

    todo, build = on_main(accelerator, prepare)
    _encode_mine(todo[rank::world], encode, root, build, rank, world, faults or Faults({}))
    _wait_for(root, todo, build, console.line, stall_s, stop)
    accelerator.wait_for_everyone()
    try:
        shards = [Shard(_shard_file(root, i)) for i in range(len(plan))]
    except (OSError, ValueError, KeyError, TypeError, struct.error, BoundsError) as exc:
        raise DataError(
            f"latent cache {root} is unusable right after it was written ({exc}); pass another --cache-dir"
        ) from None
    cache = LatentCache(shards, root)
    cache.bad_files = [tuple(b) for i in range(len(plan)) for b in json.loads(_marker(root, i).read_text())["bad"]]
    _report_bad(cache, dataset, data_cfg, console.line)
    return cache, root


class LatentBatches:
    """Seeded, rank-sharded batches of cache rows.

    Epoch ``e`` visits the rows in the order of a permutation seeded by (seed, e), the same
    on every rank. Optimizer step ``i`` of the epoch takes the next ``grad_accum`` global
    batches of ``processes x batch_size`` rows, and rank ``r`` takes the ``r``-th slice of
    each. Steps per epoch are ``N // (processes x batch_size x grad_accum)``, at least one
    (a dataset smaller than a global batch wraps around).
    """

    def __init__(
        self,
        cache: LatentCache,
        batch_size: int,
        num_processes: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        val_fraction: float = 0.0,
    ):
        self.cache, self.batch_size, self.num_processes, self.rank = cache, batch_size, num_processes, rank
        self.grad_accum, self.seed = grad_accum, seed
        # With val_fraction, a seeded subset of the rows is held out for validation, never trained on.
        held = torch.randperm(len(cache), generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_VALID)))
        n_val = int(round(len(cache) * val_fraction))
        self.val_rows = held[:n_val].sort().values  # (V,)
        self.rows = held[n_val:].sort().values  # (N - V,) the training rows
        self.global_batch = batch_size * num_processes
        self.iterations_per_epoch = self.steps_per_epoch(len(self.rows), batch_size, num_processes, grad_accum)
        self._epoch, self._perm = -1, None

    @staticmethod
    def steps_per_epoch(rows: int, batch_size: int, num_processes: int = 1, grad_accum: int = 1) -> int:
        """Optimizer steps in an epoch of ``rows`` training rows (at least one)."""
        return max(1, rows // (batch_size * num_processes * grad_accum))

    def permutation(self, epoch: int) -> torch.Tensor:
        """The training rows in epoch ``epoch``'s order."""
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_DATA, epoch))
            self._epoch, self._perm = epoch, self.rows[torch.randperm(len(self.rows), generator=gen)]
        return self._perm

    def indices(self, epoch: int, iteration: int, micro: int = 0) -> torch.Tensor:
        """Cache rows (B,) of this rank's micro-batch ``micro`` of step ``iteration``."""
        start = ((iteration * self.grad_accum + micro) * self.num_processes + self.rank) * self.batch_size
        positions = (start + torch.arange(self.batch_size)) % len(self.rows)
        return self.permutation(epoch)[positions]

    def batch(self, epoch: int, iteration: int, micro: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's moments and labels; with mirrored moments cached, each sample's
        orientation is drawn from the (seed, rank, epoch, iteration, micro) stream."""
        idx = self.indices(epoch, iteration, micro)
        flip = None
        if self.cache.has_flips:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_FLIP, self.rank, epoch, iteration, micro))
            flip = torch.rand(len(idx), generator=gen) < 0.5
        return self.cache.gather(idx, flip)
