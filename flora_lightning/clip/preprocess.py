"""CLIP's image preprocessing on the training device, in batches (``data.preprocess: device``).

``CLIPImageProcessor`` decodes, resizes, crops and normalises one image at a time on the CPU,
1-2 ms per image at 224x224: more than the vision tower's forward on a GPU. Here the work is
split in two: the loader's workers only decode (:func:`decode_image`: RGB, uint8 ``[3, H, W]``),
and :class:`DevicePreprocess` resizes, centre-crops, rescales and normalises whole batches of
those uint8 images wherever they are (the model's device), with torch ops.

Every setting comes from the checkpoint's own image processor (``size``, ``resample``,
``crop_size``, ``rescale_factor``, ``image_mean``/``image_std`` and the ``do_*`` switches), so
any CLIP checkpoint works. The result is the classic PIL ``CLIPImageProcessor``'s (transformers
4, ``CLIPImageProcessorPil`` in 5, and what the released FLoRA code ran), up to rounding:

- resize: PIL resamples horizontally, rounds half up and clips to uint8, then vertically,
  rounds and clips again. One antialiased bicubic ``interpolate`` of the whole image (what
  torchvision does on a GPU) skips the intermediate rounding and clipping: up to 24 levels off
  on noise images (measured); two passes, each rounded and clipped as PIL does, are within
  ``MAX_LEVELS_OFF`` levels of PIL (1 measured, < 0.1% of pixels off on noise). On a CPU,
  torch's native uint8 kernel makes the same two rounded passes, in 16-bit fixed point
  (``uint8_kernel_on_cpu``; what torchvision runs there: 2 levels measured, < 1% off);
- centre crop: transformers' offsets, ``(size - crop) // 2``, and its zero padding when an image
  is smaller than the crop (torchvision's ``center_crop`` rounds the offset: one pixel off when
  the margin is 3 modulo 4);
- rescale and normalise in float32, as the processor.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from math import ceil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESAMPLE = {2: "bilinear", 3: "bicubic"}
"""PIL resampling filters (``PILImageResampling`` values) whose antialiased ``interpolate``
computes PIL's own weights."""

MAX_LEVELS_OFF = 2
"""Largest difference from the PIL processor, in uint8 levels before rescaling (so at most
``MAX_LEVELS_OFF / 255 / std`` per channel after normalisation).

Why: the weights are PIL's, but PIL sums in fixed point (coefficients to 2^-22) where we sum in
float32 (or, on a CPU, torch's uint8 kernel in 16-bit fixed point, weights to 2^-15 of the
largest); the sums differ by about 0.01 level at most, far less than half a level, so a rounding
to uint8 can only differ near a tie, by 1 level. The first (horizontal) pass
is then off by at most 1 level per pixel; the vertical pass weighs those with weights whose
absolute values add up to at most 1.25 (bicubic, a = -0.5, at phase 1/2; bilinear: 1), so its
sum is off by < 2 levels and its rounding by at most 2. Clipping cannot add to a difference.
"""


@cache
def _convert_to_rgb():
    """transformers' own RGB conversion, in whichever form the installed version has it."""
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:
        # transformers 5: transparency is composited onto white
        return lambda image: convert_to_rgb(image, return_numpy=True)
    return convert_to_rgb  # transformers 4: PIL's convert("RGB")


def decode_image(image) -> torch.Tensor:
    """A PIL image (or an ``[H, W(, C)]`` uint8 array) as uint8 ``[3, H, W]`` RGB.

    The RGB conversion is transformers' (``do_convert_rgb``), so grayscale, palette and RGBA
    images become what the installed processor makes of them. The result is a channels-first
    view of the ``[H, W, 3]`` pixels (see :func:`stack_images`).
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGB" or "transparency" in image.info:  # an RGB image converts to itself
        image = _convert_to_rgb()(image)
    rgb = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(rgb).permute(2, 0, 1)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Equal-sized :func:`decode_image` results as one uint8 batch ``[B, 3, H, W]``.

    Copied as whole ``[H, W, 3]`` blocks (a batch in channels-last memory, what torch's uint8
    resize kernel reads best), not gathered channel by channel: twice as fast on a CPU.
    """
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def _get(mapping, key: str):
    """``mapping[key]`` for the dicts and ``SizeDict`` objects processors keep; None if unset."""
    value = mapping.get(key) if hasattr(mapping, "get") else getattr(mapping, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class DevicePreprocess:
    """Resize, centre crop, rescale and normalise batches of uint8 images with torch ops.

    Build it with :meth:`from_processor`; call it on a uint8 batch ``[B, 3, H, W]`` or a list of
    uint8 ``[3, H, W]`` images of mixed sizes (resized in one call per size), on any device. It
    returns float32 ``pixel_values`` ``[B, 3, crop_h, crop_w]`` on that device.
    """

    shortest_edge: int | None = None
    """Resize so the shorter side has this length (``size.shortest_edge``)."""
    size: tuple[int, int] | None = None
    """Resize to exactly ``(height, width)`` (``size.height``/``size.width``)."""
    resample: str | None = None
    """``interpolate`` mode of the resize (None: no resize)."""
    crop: tuple[int, int] | None = None
    """Centre crop ``(height, width)`` (None: no crop)."""
    rescale_factor: float | None = None
    """Multiplies the uint8 levels (None: no rescaling)."""
    mean: tuple[float, ...] | None = None
    """Per-channel mean subtracted after rescaling (None: no normalisation)."""
    std: tuple[float, ...] | None = None
    """Per-channel std divided by after subtracting the mean."""
    unsupported: str = ""
    """Why this processor cannot be reproduced here (empty: it can); raised on use."""
    uint8_kernel_on_cpu: bool = True
    """On CPU tensors, resize with torch's native uint8 kernel (the same two rounded passes in
    16-bit fixed point, what torchvision runs on a CPU; 4-5x faster there than the float passes,
    which convert every full-size image to float32 first). False: the float passes everywhere."""

    @classmethod
    def from_processor(cls, image_processor) -> DevicePreprocess:
        """The settings of a ``CLIPImageProcessor`` (or any processor with its fields)."""
        p = image_processor
        kwargs: dict = {}
        problems = []
        if getattr(p, "do_resize", True):
            size = p.size
            short, height, width = (_get(size, k) for k in ("shortest_edge", "height", "width"))
            if short is not None and _get(size, "longest_edge") is None:
                kwargs["shortest_edge"] = short
            elif height is not None and width is not None:
                kwargs["size"] = (height, width)
            else:
                problems.append(f"size={dict(size) if hasattr(size, 'keys') else size}")
            resample = int(getattr(p, "resample", 3))
            if resample in RESAMPLE:
                kwargs["resample"] = RESAMPLE[resample]
            else:
                problems.append(f"resample={resample} (only 2 bilinear and 3 bicubic)")
        if getattr(p, "do_center_crop", True):
            kwargs["crop"] = (_get(p.crop_size, "height"), _get(p.crop_size, "width"))
        if getattr(p, "do_rescale", True):
            kwargs["rescale_factor"] = float(p.rescale_factor)
        if getattr(p, "do_normalize", True):
            kwargs["mean"] = tuple(float(m) for m in p.image_mean)
            kwargs["std"] = tuple(float(s) for s in p.image_std)
        return cls(**kwargs, unsupported=", ".join(problems))

    # ------------------------------------------------------------------ geometry
    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize, as transformers computes it."""
        if self.resample is None:
            return height, width
        if self.size is not None:
            return self.size
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of the returned pixels for an input image of this size."""
        return self.crop if self.crop is not None else self.resized_shape(height, width)

    # ------------------------------------------------------------------ the transform
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Float32 pixel values of uint8 images ``[B, 3, H, W]`` (or a list of ``[3, H, W]``)."""
        if self.unsupported:
            raise ValueError(
                f"data.preprocess=device cannot reproduce this checkpoint's image processor "
                f"({self.unsupported}); set --data.preprocess processor."
            )
        if torch.is_tensor(images):
            return self._batch(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        if len({self.output_shape(*shape[-2:]) for shape in groups}) > 1:
            raise ValueError(
                "data.preprocess=device: images of different sizes give pixel values of "
                "different sizes without a centre crop (do_center_crop is false), which cannot "
                "form a batch; set --data.preprocess processor or use equal-sized images."
            )
        out = None
        for index in groups.values():
            pixels = self._batch(torch.stack([images[i] for i in index]))
            if out is None:
                out = pixels.new_empty((len(images), *pixels.shape[1:]))
            out[index] = pixels
        if out is None:  # an empty list
            raise ValueError("DevicePreprocess: no images in the batch.")
        return out

    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"DevicePreprocess takes uint8 images [B, 3, H, W] (got {images.dtype} "
                f"{tuple(images.shape)})."
            )
        if len(images) == 0:  # an empty Poisson batch (DP-SGD): interpolate needs rows
            height, width = self.output_shape(*images.shape[-2:])
            return images.new_zeros((0, images.shape[1], height, width), dtype=torch.float32)
        # autocast off: the resize and normalisation stay float32 under mixed precision
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images
            if self.resample is not None:
                x = self._resize(x, *self.resized_shape(*x.shape[-2:]))
            if self.crop is not None:  # on uint8 levels: crop, then convert what is kept
                x = self._center_crop(x, *self.crop)
            # (x * rescale - mean) / std as one scale and one shift, in place on a fresh float
            # tensor (as transformers' torchvision backend fuses them): two memory passes, not
            # four; the same up to float32 rounding
            scale = torch.full((x.shape[-3], 1, 1), self.rescale_factor or 1.0, device=x.device)
            shift = torch.zeros_like(scale)
            if self.mean is not None:
                std = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
                scale = scale / std
                shift = -torch.tensor(self.mean, device=x.device).view(-1, 1, 1) / std
            # a fresh, contiguous float tensor (whatever the input's memory format)
            x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            return x.mul_(scale).add_(shift)

    def _resize(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """PIL's two passes: horizontal, then vertical, each rounded half up and clipped to
        uint8 levels (see the module docstring); a side that keeps its length is not touched.
        uint8 in, uint8 levels out (as uint8 on a CPU, as float32 elsewhere)."""
        if (height, width) == tuple(images.shape[-2:]):
            return images
        if images.device.type == "cpu" and self.uint8_kernel_on_cpu:
            return F.interpolate(
                images, (height, width), mode=self.resample, align_corners=False, antialias=True
            )
        x = images.float()
        for new_height, new_width in ((x.shape[-2], width), (height, width)):
            if (new_height, new_width) == tuple(x.shape[-2:]):
                continue
            x = F.interpolate(
                x, (new_height, new_width), mode=self.resample, align_corners=False, antialias=True
            )
            x = x.add_(0.5).floor_().clamp_(0, 255)
        return x

    @staticmethod
    def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """transformers' ``center_crop``: offsets ``(size - crop) // 2``; an image smaller than
        the crop is first placed ``ceil(margin / 2)`` into a zero canvas of the crop's size."""
        old_h, old_w = x.shape[-2:]
        top, left = (old_h - height) // 2, (old_w - width) // 2
        if top >= 0 and left >= 0:
            return x[..., top : top + height, left : left + width]
        canvas_h, canvas_w = max(height, old_h), max(width, old_w)
        pad_top, pad_left = ceil((canvas_h - old_h) / 2), ceil((canvas_w - old_w) / 2)
        canvas = x.new_zeros((*x.shape[:-2], canvas_h, canvas_w))
        canvas[..., pad_top : pad_top + old_h, pad_left : pad_left + old_w] = x
        top, left = top + pad_top, left + pad_left
        return canvas[..., top : top + height, left : left + width]
