"""DevicePreprocess: batched resize/crop/normalise on uint8 tensors equals CLIPImageProcessor.

The reference is transformers' own processor run per PIL image; the tolerance is stated in
uint8 levels and derived from what differs (see ``LEVELS``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor

from flora_lightning.clip.preprocess import DevicePreprocess, decode_image

try:  # transformers 5: CLIPImageProcessor is torchvision-based, the PIL one has its own class
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
except ImportError:  # transformers 4: CLIPImageProcessor itself resizes with PIL
    CLIPImageProcessorPil = None

REFERENCES = {
    "pil": CLIPImageProcessorPil or CLIPImageProcessor,
    **({"torchvision": CLIPImageProcessor} if CLIPImageProcessorPil is not None else {}),
}

LEVELS = 2
"""Tolerance in uint8 levels (before rescaling; ``LEVELS / 255 / std`` after normalising).

Both references resize in two separable passes rounded to uint8 in between (PIL: 22-bit fixed
point; torchvision's uint8 CPU kernel: 16-bit fixed point), with the same antialiased bicubic
weights as our float32 passes. The sums differ by far less than half a level, so a rounding
can flip only at a near-tie, by 1 level: 1 level after the horizontal pass, and after the
vertical pass at most sum|w| <= 1.25 (bicubic, a = -0.5) times that, < 2 levels before rounding,
<= 2 after. Crop, rescale and normalise are the same float32 arithmetic (+ 1e-5 slack for
float32 rounding of values up to ~2.6).
"""
FLOAT_SLACK = 1e-5


def random_images(seed: int = 0) -> list[Image.Image]:
    """Random-content images of several sizes, aspect ratios and modes: noise (the hardest
    case for resampling), smooth gradients with sharp edges, grayscale, RGBA, palette; some
    smaller than the 224 crop, one with a crop margin of 3 (200x203 -> 224x227: transformers
    starts the crop at 1, torchvision's center_crop at round(1.5) = 2)."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in [(375, 500), (500, 375), (300, 300), (200, 203), (40, 60), (8, 8)]:
        noise = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        images.append(Image.fromarray(noise[..., :3], "RGB"))
        images.append(Image.fromarray(noise, "RGBA"))  # alpha varies per pixel
        ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
        ramp[height // 3 : 2 * height // 3, width // 4 : width // 2] = 255 - ramp[0, 0]  # edges
        images.append(Image.fromarray(ramp.astype(np.uint8), "L"))
    images.append(Image.fromarray(noise[..., :3], "RGB").convert("P"))  # palette
    return images


@pytest.fixture(scope="module")
def digits_images(offline_assets) -> list[Image.Image]:
    """Real images: the offline digits (8x8 grayscale PNGs, far smaller than any crop)."""
    from datasets import load_dataset

    from flora_lightning.offline import digits_data_files

    data = load_dataset("parquet", data_files=digits_data_files())["test"]
    return [data[i]["image"] for i in range(48)]


def levels_off(ours: torch.Tensor, reference: torch.Tensor, std) -> torch.Tensor:
    """|ours - reference| in uint8 levels (normalised values times std times 255)."""
    return (ours - reference).abs() * torch.tensor(std).view(3, 1, 1) * 255


def check_close(ours: torch.Tensor, reference: torch.Tensor, std) -> None:
    """Within LEVELS everywhere, and equal (to the level) on most pixels."""
    assert ours.shape == reference.shape
    assert ours.dtype == torch.float32
    bound = LEVELS / 255 / torch.tensor(std).view(3, 1, 1) + FLOAT_SLACK
    assert ((ours - reference).abs() <= bound).all(), levels_off(ours, reference, std).max()
    off = levels_off(ours, reference, std)
    # A flip needs a sum within ~1e-4 of a half-level: on noise < 0.1% of pixels (vs PIL),
    # < 1% (vs torchvision's 16-bit weights); a linear ramp shrunk by 6-7.5x hits exact
    # half-levels often (3.2% measured, bilinear). Most pixels must agree all the same.
    assert (off < 0.5).float().mean() >= 0.95
    assert off.mean() < 0.05


@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("uint8_kernel", [True, False], ids=["cpu-kernel", "float-passes"])
def test_equals_the_processor_on_random_images(reference, uint8_kernel):
    """Both resize paths: torch's uint8 kernel (used on CPU tensors) and the float passes (used
    on a GPU), each checked here on the CPU."""
    processor = REFERENCES[reference]()  # CLIP's defaults: shortest edge 224, crop 224
    transform = DevicePreprocess.from_processor(processor)
    transform = dataclasses.replace(transform, uint8_kernel_on_cpu=uint8_kernel)
    images = random_images()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    # one call: a list of mixed sizes, resized one batch per size, in the original order
    ours = transform([decode_image(image) for image in images])
    assert ours.shape == (len(images), 3, 224, 224)
    for got, want in zip(ours, expected, strict=True):
        check_close(got, want, processor.image_std)


@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("uint8_kernel", [True, False], ids=["cpu-kernel", "float-passes"])
def test_equals_the_processor_on_digits_in_one_batch(reference, uint8_kernel, digits_images):
    """Equal-sized real images: one uint8 tensor, one resize; the tiny CLIP's own settings
    (32 px) and CLIP's (224 px)."""
    batch = torch.stack([decode_image(image) for image in digits_images])
    assert batch.dtype == torch.uint8 and batch.shape == (48, 3, 8, 8)
    for size in (32, 224):
        processor = REFERENCES[reference](
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        expected = processor(images=digits_images, return_tensors="pt")["pixel_values"]
        transform = DevicePreprocess.from_processor(processor)
        ours = dataclasses.replace(transform, uint8_kernel_on_cpu=uint8_kernel)(batch)
        for got, want in zip(ours, expected, strict=True):
            check_close(got, want, processor.image_std)


def test_settings_come_from_the_processor():
    """Another checkpoint's config (exact-size resize, bilinear, other crop, mean and std, a
    crop larger than the resized image: zero padding) is followed, not CLIP's defaults."""
    processor = REFERENCES["pil"](
        size={"height": 40, "width": 50},
        resample=2,
        crop_size={"height": 45, "width": 47},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    transform = DevicePreprocess.from_processor(processor)
    assert transform.resample == "bilinear" and transform.size == (40, 50)
    images = random_images(seed=1)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = transform([decode_image(image) for image in images])
    assert ours.shape == (len(images), 3, 45, 47)
    for got, want in zip(ours, expected, strict=True):
        check_close(got, want, processor.image_std)
    # the zero-padded rows (45 - 40: 3 on top, 2 below) hold pixel value 0, normalised
    pad = (0 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.3])
    assert torch.allclose(ours[:, :, :3, 10], pad.view(1, 3, 1).expand(len(images), 3, 3))


def test_a_wrong_transform_fails_the_check():
    """The check has teeth: a wrong mean, no crop (resize only), a one-pass resize (no
    intermediate rounding, as torchvision on a GPU) or torchvision's rounded crop offset
    (odd margin) each fail it."""
    processor = REFERENCES["pil"]()
    right = DevicePreprocess.from_processor(processor)
    images = random_images()
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    decoded = [decode_image(image) for image in images]

    def fails(transform) -> bool:
        try:
            for got, want in zip(transform(decoded), expected, strict=True):
                check_close(got, want, processor.image_std)
        except AssertionError:
            return True
        return False

    class OnePass(DevicePreprocess):
        def _resize(self, images, height, width):
            x = F.interpolate(images.float(), (height, width), mode="bicubic", antialias=True)
            return x.round().clamp(0, 255)

    class RoundedCrop(DevicePreprocess):
        @staticmethod
        def _center_crop(x, height, width):
            top = round((x.shape[-2] - height) / 2)
            left = round((x.shape[-1] - width) / 2)
            return x[..., top : top + height, left : left + width]

    assert not fails(right)
    assert fails(dataclasses.replace(right, mean=(0.5, 0.5, 0.5)))
    assert fails(dataclasses.replace(right, crop=None, shortest_edge=None, size=(224, 224)))
    assert fails(OnePass(**dataclasses.asdict(right)))
    assert fails(RoundedCrop(**dataclasses.asdict(right)))


def test_decode_converts_like_the_processor():
    """Grayscale is repeated, RGBA and palette images become what transformers' own
    convert_to_rgb makes of them (transformers 5: alpha composited on white)."""
    from transformers.image_transforms import convert_to_rgb

    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red
    gray = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3) * 40, "L")
    decoded = decode_image(gray)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 2, 3)
    assert torch.equal(decoded[0], decoded[2]) and decoded[1, 1, 2] == 200
    image = Image.fromarray(rgba, "RGBA")
    try:
        want = np.asarray(convert_to_rgb(image, return_numpy=True))
    except TypeError:  # transformers 4
        want = np.asarray(convert_to_rgb(image))
    assert torch.equal(decode_image(image), torch.from_numpy(want.copy()).permute(2, 0, 1))


def test_empty_batch_and_bad_inputs():
    transform = DevicePreprocess.from_processor(REFERENCES["pil"]())
    empty = transform(torch.zeros((0, 3, 50, 60), dtype=torch.uint8))  # empty Poisson batch
    assert empty.shape == (0, 3, 224, 224) and empty.dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        transform(torch.zeros((1, 3, 50, 60)))
    lanczos = DevicePreprocess.from_processor(REFERENCES["pil"](resample=1))
    with pytest.raises(ValueError, match=r"resample=1.*--data\.preprocess processor"):
        lanczos(torch.zeros((1, 3, 50, 60), dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reference", sorted(REFERENCES))
def test_equals_the_processor_on_cuda(reference, digits_images):
    """On a GPU (the point of it): uint8 batches moved to CUDA give the processor's pixels
    within the same bound (CUDA's antialiased kernel sums PIL's weights in float32 too)."""
    processor = REFERENCES[reference]()
    transform = DevicePreprocess.from_processor(processor)
    images = random_images() + digits_images[:8]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]  # on the CPU
    ours = transform([decode_image(image).cuda() for image in images])
    assert ours.device.type == "cuda"
    for got, want in zip(ours.cpu(), expected, strict=True):
        check_close(got, want, processor.image_std)
    # under autocast too: the transform stays float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        again = transform([decode_image(image).cuda() for image in images])
    assert again.dtype == torch.float32 and torch.equal(again, ours)
