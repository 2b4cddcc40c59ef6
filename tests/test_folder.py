"""The image-folder source on generated folders: modes, sizes, extensions, hidden files,
each kind of bad file with its one-line error, the skip policy, and mirrored latents."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow.commands import TERMINAL
from latentflow.config import DataConfig
from latentflow.data import build_dataset, load_image
from latentflow.errors import DataError
from latentflow.latents import LatentBatches, load_or_build_cache
from latentflow.vae import FrozenVAE
from tests.conftest import SMOKE, make_tiny_vae, run_main


def rgb(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def make_folder(root, per_class=3):
    """Two classes of small RGB images in assorted formats, plus things to skip."""
    for c, color in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            rgb(40 + 7 * i, 30 + 5 * i, color).save(root / c / f"{i}.png")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    (root / "cats" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "cats" / "labels.csv").write_text("name,label\n")
    return root


def folder_cfg(root, **kw):
    return DataConfig(**{"source": "folder", "path": str(root), "image_size": 16, **kw})


def test_class_folders_become_sorted_labels_and_hidden_or_other_files_are_skipped(tmp_path):
    root = make_folder(tmp_path / "pets")
    ds = build_dataset(folder_cfg(root), channels=3)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and len(ds) == 6
    assert [p.name for p in ds.ignored] == ["labels.csv"]
    x, label, index, reason = ds[4]
    assert x.shape == (3, 16, 16) and reason == "" and label == 1 and index == 4
    assert x[2].mean() > x[0].mean()  # dogs are blue
    flat = build_dataset(folder_cfg(root / "cats"), channels=1)  # no sub-folders: unlabelled
    assert flat.num_classes == 0 and flat.class_names == [] and len(flat) == 3
    chosen = build_dataset(folder_cfg(root, class_names=["dogs"]), channels=3)
    assert chosen.class_names == ["dogs"] and len(chosen) == 3


def test_modes_sizes_and_extensions_are_brought_to_the_vae(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("L", (20, 20), 100).save(d / "gray.PNG")  # upper-case extension
    rgb(30, 30).save(d / "actually_png.jpg", format="PNG")  # content decides, not the name
    la = Image.new("LA", (20, 20), (0, 0))  # fully transparent gray
    la.save(d / "la.png")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # transparent red
    rgba.save(d / "rgba.png")
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 255, 0] * 256)
    p.info["transparency"] = 0
    p.save(d / "palette.png", transparency=0)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(d / "deep.png")  # 16-bit white
    rgb(12, 12).save(d / "small.webp")  # smaller than the training size (but over half): scaled up
    for name, expect in [("gray.PNG", 100), ("la.png", 255), ("deep.png", 255)]:
        assert load_image(d / name, 16, 1, "white").mean() == pytest.approx(expect, abs=1)
    assert load_image(d / "la.png", 16, 1, "black").max() == 0  # the stated background shows through
    assert tuple(load_image(d / "rgba.png", 16, 3, "white")[0, 0]) == (255, 255, 255)
    assert tuple(load_image(d / "palette.png", 16, 3, "black")[0, 0]) == (0, 0, 0)
    r, g, b = load_image(d / "cmyk.jpg", 16, 3).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    ds = build_dataset(folder_cfg(d), channels=3)
    assert len(ds) == 8 and all(ds[i][3] == "" and ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("L", (32, 16), 0)
    img.paste(255, (0, 0, 16, 16))  # left half white, wider than tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    out = load_image(tmp_path / "rot.jpg", 16, 1)[..., 0]
    # displayed upright it is tall: the white half is on top; the centre crop keeps rows 8-24
    assert out[:4].mean() > 200 and out[-4:].mean() < 50


def truncated(path, fmt):
    rgb(64, 64, (10, 200, 90)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bomb(path):
    """A PNG whose header claims 20 000 x 20 000 pixels (more than twice Pillow's limit)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "it is an empty file (0 bytes)"),
        (lambda p: p.write_text("<html><body>Not found</body></html>"), "it is not an image Pillow can read"),
        (lambda p: truncated(p, "PNG"), "it is damaged or unreadable"),
        (
            lambda p: truncated(p.with_suffix(".jpg"), "JPEG") or p.with_suffix(".jpg").rename(p),
            "it is damaged or unreadable",
        ),
        (bomb, "it is too large to decode safely"),
        (lambda p: p.symlink_to(p.parent / "nowhere.png"), "it is damaged or unreadable"),
        (lambda p: rgb(8, 8).save(p), "it is 8x8 pixels, under half of data.image_size=32"),
        (lambda p: rgb(2000, 40).save(p), "it is 40x2000 pixels: a square centre crop would keep only 2% of it"),
    ],
    ids=[
        "zero-byte",
        "html-as-image",
        "truncated-png",
        "truncated-jpeg",
        "decompression-bomb",
        "broken-link",
        "tiny",
        "extreme-aspect",
    ],
)
def test_each_bad_file_is_one_line_naming_it(tmp_path, tiny_vae_dir, accelerator, make, message):
    root = make_folder(tmp_path / "pets")
    bad = root / "dogs" / "bad.png"
    make(bad)
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    ds = build_dataset(folder_cfg(root, image_size=32), channels=1)
    with pytest.raises(DataError) as info:
        load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=folder_cfg(root, decode_workers=0))
    text = str(info.value)
    assert text.startswith(f"{bad}: {message}") and "\n" not in text
    assert text.endswith("fix or remove it, or set data.skip_bad_images=true to skip bad files")


def test_skip_bad_images_counts_them_and_stops_past_the_fraction(tmp_path, tiny_vae_dir, accelerator, capsys):
    root = make_folder(tmp_path / "pets", per_class=10)
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "page.JPG").write_text("<html>")
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    ds = build_dataset(folder_cfg(root, image_size=32), channels=1)
    lenient = folder_cfg(root, image_size=32, skip_bad_images=True, max_bad_fraction=0.2, decode_workers=2)
    cache, _ = load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=lenient, console=TERMINAL)
    out = capsys.readouterr().out
    assert "skipped 2 bad file(s) of 22 (9.09%)" in out and "empty.jpg: it is an empty file" in out
    assert len(cache) == 20 and torch.equal(cache.labels, ds.labels[cache.indices])
    again, _ = load_or_build_cache(
        vae, ds, tmp_path / "cache", accelerator, data_cfg=lenient, console=TERMINAL
    )  # warm: said again
    assert "using latent cache" in capsys.readouterr().out and len(again.bad_files) == 2
    strict = folder_cfg(root, image_size=32, skip_bad_images=True, max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"2 of 22 files of .* are bad \(9.1%, more than data.max_bad_fraction=0.05\)"):
        load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=strict)
    with pytest.raises(DataError, match="empty.jpg: it is an empty file"):  # the default policy, warm cache too
        load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=folder_cfg(root, image_size=32))


@pytest.mark.parametrize(
    "layout,message",
    [
        ({"empty": []}, "holds no image files"),
        ({"a": ["0.png"], "b": []}, "class folder {root}/b has no images"),
        ({"a": ["0.png"], ".": ["loose.png"]}, "has class folders and also images directly in it"),
    ],
)
def test_empty_folders_and_mixed_layouts(tmp_path, layout, message):
    root = tmp_path / "d"
    root.mkdir()
    for folder, files in layout.items():
        (root / folder).mkdir(exist_ok=True)
        for f in files:
            rgb(8, 8).save(root / folder / f)
    target = root / "empty" if "empty" in layout else root
    with pytest.raises(DataError, match=message.format(root=root)):
        build_dataset(folder_cfg(target), channels=3)
    with pytest.raises(DataError, match="not found"):
        build_dataset(folder_cfg(tmp_path / "missing"), channels=3)


def test_hflip_caches_both_orientations_and_batches_use_both(tmp_path, accelerator):
    vae_dir = make_tiny_vae(tmp_path / "vae3", in_channels=3)
    vae = FrozenVAE.from_pretrained(str(vae_dir))
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(8):
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        img.paste((255, 255, 255), (0, 0, 8 + i, 32))  # bright on the left: not mirror-symmetric
        img.save(root / f"{i}.png")
    cfg = folder_cfg(root, image_size=32, hflip=True)
    ds = build_dataset(cfg, channels=3)
    cache, _ = load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=cfg)
    assert cache.has_flips
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    mirror_mean, mirror_std = vae.encode(images.flip(-1))
    torch.testing.assert_close(cache.mean_flip, mirror_mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.std_flip, mirror_std, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cache.mean, cache.mean_flip)
    batches = LatentBatches(cache, batch_size=8, seed=0)
    means = torch.cat([batches.batch(e, 0)[0] for e in range(6)])
    idx = torch.cat([batches.indices(e, 0) for e in range(6)])
    is_flip = [bool(torch.equal(m, cache.mean_flip[i])) for m, i in zip(means, idx)]
    is_plain = [bool(torch.equal(m, cache.mean[i])) for m, i in zip(means, idx)]
    assert all(a != b for a, b in zip(is_flip, is_plain)) and 10 < sum(is_flip) < 38
    plain, _ = load_or_build_cache(vae, ds, tmp_path / "cache", accelerator, data_cfg=folder_cfg(root, image_size=32))
    assert not plain.has_flips  # hflip is part of what the cache was made from


@pytest.mark.slow
def test_the_rgb_experiment_runs_on_a_folder_with_a_tiny_vae(tmp_path):
    """experiments/celeba64.yaml, with a tiny 3-channel VAE in place of the Hub one."""
    vae_dir = make_tiny_vae(tmp_path / "vae3", in_channels=3)
    root = tmp_path / "celeba"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(root / f"{i:06d}.jpg")
    proc = run_main(
        "--config",
        str(SMOKE).replace("smoke.yaml", "celeba64.yaml"),
        "--set",
        f"vae.pretrained={vae_dir}",
        "--set",
        f"data.path={root}",
        "--set",
        "train.epochs=1",
        "--set",
        "model.name=DiT-Nano/2",
        "--set",
        "train.batch_size=8",
        "--set",
        "sampler.steps=2",
        "--output-dir",
        tmp_path / "runs",
    )
    run = next((tmp_path / "runs").iterdir())
    assert "on 24 latents (4, 16, 16)" in proc.stdout
    grid = np.asarray(Image.open(run / "figures" / "final.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3  # RGB samples
    assert (run / "export" / "vae" / "config.json").is_file()


def test_max_items_takes_a_seeded_class_balanced_subset(tmp_path):
    from latentflow.data.shapes import write_shapes_folder

    root = write_shapes_folder(tmp_path / "shapes", per_class=10, size=16)
    ds = build_dataset(folder_cfg(root, max_items=7), channels=3)
    counts = np.bincount(ds.labels.numpy(), minlength=3)
    assert sorted(counts.tolist()) == [2, 2, 3]  # not the first 7 files, all circles
    assert ds.subset.startswith("7 of the folder's images") and "circle" in ds.subset and "triangle" in ds.subset
    again = build_dataset(folder_cfg(root, max_items=7), channels=3)
    assert [str(p) for p in again.files] == [str(p) for p in ds.files]  # seeded: the same every time
    with pytest.raises(DataError, match="data.max_items=2 is fewer than its 3 classes.*at least 3"):
        build_dataset(folder_cfg(root, max_items=2), channels=3)


def test_colour_data_is_never_made_grey_silently(tmp_path):
    from latentflow.data import check_channels

    root = make_folder(tmp_path / "pets")
    with pytest.raises(DataError, match=r"in colour but VAE embedded takes 1 channel.*data.convert_to_gray=true"):
        check_channels(folder_cfg(root), 1, "embedded")
    assert "made grey" in check_channels(folder_cfg(root, convert_to_gray=True), 1, "embedded")
    assert check_channels(folder_cfg(root), 3, "my-vae") == ""  # colour in, colour out: nothing to say
    assert "repeated to 3 channels" in check_channels(DataConfig(), 3, "sd-vae")  # grey digits, colour VAE
    with pytest.raises(DataError, match="VAE two takes 2-channel images.*a VAE of 1 or 3 input channels"):
        check_channels(DataConfig(), 2, "two")


def test_encode_takes_and_says_the_data_as_training_does(tmp_path, tiny_vae_dir, capsys):
    from latentflow.commands.encode import encode_experiment
    from latentflow.config import load_config

    root = make_folder(tmp_path / "pets")
    sets = ["data.source=folder", f"data.path={root}", f"vae.pretrained={tiny_vae_dir}", "data.image_size=32"]
    with pytest.raises(DataError, match=r"in colour but VAE .* takes 1 channel"):  # not made grey unasked
        encode_experiment(load_config(SMOKE, sets), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    encode_experiment(load_config(SMOKE, [*sets, "data.convert_to_gray=true"]), tmp_path / "cache")
    out = capsys.readouterr().out
    assert "colour images made grey" in out and "transparent pixels, where images have them, are laid on white" in out
    assert "file(s) skipped as not images by their extension" in out


def test_awkward_names_links_and_unknown_formats_are_walked_once_and_said(tmp_path):
    """A link back up the tree, a name that is not UTF-8, a newline in a name, a format Pillow
    does not know: the scan ends, the fingerprint is computed, each is said in one line."""
    from latentflow.errors import printable

    root = make_folder(tmp_path / "pets")
    (root / "cats" / "loop").symlink_to(root / "cats")
    (root / "cats" / "again").symlink_to(".")  # two links to the folder itself: 2^depth paths if followed
    rgb(20, 20).save(os.fsdecode(bytes(root / "dogs") + b"/\xff\xfe.png"), format="PNG")
    (root / "dogs" / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(200))
    ds = build_dataset(folder_cfg(root), channels=3)
    assert len(ds) == 3 + 3 + 1 and len(ds.fingerprint()) == 16  # cats once (not via the links), dogs + the odd name
    notes = ds.notes
    assert any("2 file(s) skipped as not images by their extension (e.g. cats/labels.csv)" in n for n in notes)
    assert any("laid on white (data.background)" in n for n in notes)
    line = printable(f"{root}/bad\nname\0.png: it is an empty file")
    assert "\n" not in line and "bad\\nname\\x00.png" in line
    assert printable(os.fsdecode(b"\xff")) == "\\udcff"


def test_reconstruct_counts_only_the_images_it_used(tmp_path, tiny_vae_dir):
    from latentflow.reconstruction import reconstruct

    root = make_folder(tmp_path / "pets", per_class=4)
    (root / "cats" / "empty.png").write_bytes(b"")
    vae = FrozenVAE.from_pretrained(str(tiny_vae_dir))
    metrics = reconstruct(vae, folder_cfg(root, image_size=32, skip_bad_images=True), tmp_path / "r.png", show=4)
    assert metrics["num_images"] == 8 and metrics["skipped_files"] == 1
