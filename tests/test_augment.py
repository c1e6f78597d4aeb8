"""Image augmentation against torchvision's definitions (fairseq image_pretraining: ColorJitter(0.4,
0.4, 0.4) on the whole image, flip, RandomResizedCrop bicubic): the color statistics of a constant
image, the contrast's whole-image mean, the draws, and the PIL / DALI CPU / DALI-ops paths agreeing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2v_engine.config import DataConfig
from d2v_engine.data import build_dataset
from d2v_engine.data.augment import draw_jitter, jitter_pil, jitter_uint8
from d2v_engine.data.images import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "data" / "images" / "photos"
COLOR = (200, 120, 40)
N = 300


def _pixels(source: torch.Tensor) -> torch.Tensor:
    """Normalized B x 3 x S x S -> 0..255 levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (source * std + mean) * 255.0


def _reference_constant(color, strengths, n, seed):
    """torchvision ColorJitter on a constant image, from its definition: a random order of
    brightness / contrast / saturation, factors uniform in [1 - s, 1 + s]; each op
    trunc(clip(d + f (x - d))) with d = 0 (brightness) or the gray level (contrast: the image's
    mean gray; saturation: the pixel's gray; both the same on a constant image)."""
    g = np.random.default_rng(seed)
    out = np.empty((n, 3))
    for i in range(n):
        x = np.array(color, dtype=np.float32)
        for op in g.permutation(3):
            f = np.float32(g.uniform(1 - strengths[op], 1 + strengths[op]))
            gray = (19595 * int(x[0]) + 38470 * int(x[1]) + 7471 * int(x[2]) + 0x8000) >> 16
            d = np.float32(0 if op == 0 else gray)
            x = np.floor(np.clip(d + f * (x - d), 0, 255)).astype(np.float32)
        out[i] = x
    return out


@pytest.fixture(scope="module")
def constant_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("constant")
    for i in range(N):
        Image.new("RGB", (40 + i % 7, 30 + i % 5), COLOR).save(root / f"{i:03d}.png")
    return root


def _loader_batches(kind, root, **data):
    from d2v_engine.data.dali_images import DaliImageLoader
    from d2v_engine.data.loader import BatchPlan, make_loader

    cfg = DataConfig(path=str(root), img_size=16, crop_scale=[0.2, 1.0], **data)
    ds = build_dataset(cfg, "image")
    plan = BatchPlan.make(50, 50, 1)
    if kind == "pil":
        return list(make_loader(ds, plan, 0, 5, 0, N // 50))
    return list(DaliImageLoader(ds, plan, 0, 5, 0, N // 50))


@pytest.mark.parametrize("kind", ["pil", "dali_cpu"])
def test_color_jitter_statistics_on_a_constant_image_match_torchvision(kind, constant_folder):
    pytest.importorskip("nvidia.dali") if kind == "dali_cpu" else None
    batches = _loader_batches(kind, constant_folder, color_jitter=[0.4, 0.4, 0.4])
    px = torch.cat([_pixels(b["source"]) for b in batches])
    assert px.shape[0] == N
    # jitter, crop, resize and flip keep a constant image constant
    spread = (px.amax(dim=(2, 3)) - px.amin(dim=(2, 3))).max().item()
    assert spread < 1e-3, f"a constant image came out with {spread:.4f} levels of spread"
    ours = px[:, :, 0, 0].round().double().numpy()
    ref = _reference_constant(COLOR, (0.4, 0.4, 0.4), 20000, seed=0)
    # The reference's support: contrast and saturation pull towards gray, brightness scales.
    assert ours.min() >= ref.min(0).min() - 0.5 and ours.max() <= 255
    for c in range(3):
        m, s = ref[:, c].mean(), ref[:, c].std()
        se = s / np.sqrt(N)
        assert abs(ours[:, c].mean() - m) < 4 * se, (c, ours[:, c].mean(), m, se)
        assert abs(ours[:, c].std() - s) < 0.15 * s, (c, ours[:, c].std(), s)
    # Colours really vary (the ops are on), and in ways brightness alone cannot make: the
    # channel ratios change (contrast and saturation move the channels towards gray).
    ratio = ours[:, 2] / np.maximum(ours[:, 0], 1)
    assert ratio.std() > 0.02, f"blue / red ratio barely varies: {ratio.std():.4f}"


@pytest.mark.parametrize("kind", ["pil", "dali_cpu"])
def test_no_jitter_leaves_a_constant_image_exactly_its_color(kind, constant_folder):
    pytest.importorskip("nvidia.dali") if kind == "dali_cpu" else None
    batches = _loader_batches(kind, constant_folder, color_jitter=[0.0, 0.0, 0.0])
    px = torch.cat([_pixels(b["source"]) for b in batches])
    err = (px - torch.tensor(COLOR, dtype=torch.float32).view(1, 3, 1, 1)).abs().max().item()
    assert err < 1e-3, f"color moved by {err:.4f} levels without jitter"


def test_contrast_blends_towards_the_whole_images_mean_not_the_crops():
    # Left half black, right half white: the whole image's mean gray is 128, a crop of the
    # right half has mean 255. torchvision jitters before cropping, so a contrast of 0.5 makes
    # the white half 128 + 0.5 * (255 - 128) = 191.5 -> 191.
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 32))
    out = np.asarray(jitter_pil(img, (("contrast", 0.5),)))
    assert out[0, 63].tolist() == [191, 191, 191], out[0, 63]
    torch_out = jitter_uint8(torch.from_numpy(np.asarray(img).copy()), (("contrast", 0.5),))
    assert torch_out[0, 63].tolist() == [191, 191, 191]


def test_jitter_uint8_is_pil_imageenhance_bit_for_bit():
    rng = np.random.default_rng(0)
    for path in sorted(PHOTOS.glob("*.jpg"))[:6]:
        img = Image.open(path).convert("RGB")
        for strengths in ([0.4, 0.4, 0.4], [0.9, 0.0, 0.9], [0.0, 0.8, 0.0]):
            jitter = draw_jitter(strengths, rng)
            a = np.asarray(jitter_pil(img, jitter))
            b = jitter_uint8(torch.from_numpy(np.asarray(img).copy()), jitter).numpy()
            assert np.array_equal(a, b), (path.name, jitter, np.abs(a.astype(int) - b).max())


def test_jitter_draws_follow_colorjitter_get_params():
    rng = np.random.default_rng(1)
    draws = [draw_jitter([0.4, 0.2, 0.0], rng) for _ in range(2000)]
    assert all(len(d) == 2 and {op for op, _ in d} == {"brightness", "contrast"} for d in draws)
    b = np.array([f for d in draws for op, f in d if op == "brightness"])
    c = np.array([f for d in draws for op, f in d if op == "contrast"])
    assert 0.6 <= b.min() and b.max() <= 1.4 and abs(b.mean() - 1.0) < 0.02
    assert 0.8 <= c.min() and c.max() <= 1.2
    first = np.mean([d[0][0] == "brightness" for d in draws])
    assert 0.45 < first < 0.55, f"order not a uniform permutation: brightness first {first:.3f}"
    assert draw_jitter([0, 0, 0], rng) == ()


def test_dali_jitter_ops_equal_the_pil_arithmetic():
    """The GPU graph's dali_jitter, run on DALI's CPU backend, against jitter_uint8 (= PIL)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    from d2v_engine.data.dali_images import dali_jitter, jitter_slots, slot_ops

    files = sorted(PHOTOS.glob("*.jpg"))[:4]
    encoded = [np.fromfile(f, dtype=np.uint8) for f in files]
    rng = np.random.default_rng(2)
    jitters = [draw_jitter([0.4, 0.4, 0.4], rng) for _ in files]
    slots = [jitter_slots(j) for j in jitters]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        enc, sl = fn.external_source(source=lambda: [encoded, slots], num_outputs=2, batch=True,
                                     dtype=[types.UINT8, types.FLOAT])
        img = fn.decoders.image(enc, device="cpu", output_type=types.RGB)
        return dali_jitter(img, sl), img

    p = pipe()
    p.build()
    out, decoded = p.run()
    for i, path in enumerate(files):
        ref = jitter_uint8(torch.from_numpy(np.asarray(decoded[i]).copy()), slot_ops(slots[i]))
        diff = np.abs(np.asarray(out[i]).astype(int) - ref.numpy().astype(int)).max()
        assert diff == 0, f"{path.name}: DALI jitter differs by {diff} levels"


def test_dali_ops_graph_crops_and_jitters_as_pil():
    """The whole GPU graph (dali_graph) on DALI's CPU backend: same crops and colors as PIL; only
    DALI's resampling filter differs from PIL's (as without jitter)."""
    pytest.importorskip("nvidia.dali")
    from d2v_engine.data.dali_images import DaliImageLoader
    from d2v_engine.data.loader import BatchPlan, make_loader

    class AllInDali(DaliImageLoader):
        def graph(self, inputs, gpu):
            return self.dali_graph(inputs, "cpu")

        def finish(self, prepared, outputs):
            return {"source": self.to_torch(outputs[0], self.dtype), "padding_mask": None}

    diffs = {}
    for jitter in ([0.4, 0.4, 0.4], [0.0, 0.0, 0.0]):
        cfg = DataConfig(path=str(PHOTOS), img_size=24, crop_scale=[0.2, 1.0], color_jitter=jitter)
        ds = build_dataset(cfg, "image")
        plan = BatchPlan.make(4, 4, 1)
        ours = list(AllInDali(ds, plan, 0, 3, 0, 3))
        ref = list(make_loader(ds, plan, 0, 3, 0, 3))
        diffs[jitter[0]] = torch.cat([(_pixels(a["source"]) - _pixels(b["source"])).abs().flatten()
                                      for a, b in zip(ours, ref)]).mean().item()
    assert diffs[0.4] < 1.5 * diffs[0.0] + 0.1, f"jitter adds DALI/PIL disagreement: {diffs}"
    assert diffs[0.4] < 1.0, f"DALI graph and PIL differ by {diffs[0.4]:.2f} levels on average"
