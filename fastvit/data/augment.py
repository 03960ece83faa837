"""Image decoding and the keyed image augmentations, written once for the CPU loader workers and the GPU path.

Training: random resized crop (torchvision's algorithm: 10 tries of scale 0.08-1 and log-uniform ratio 3/4-4/3,
else a centre crop), horizontal flip, ImageNet normalisation. Its randomness is not torch's RNG but 24 keyed
uniforms per sample (``fastvit.data.keyed.keyed_uniform``), turned into crop boxes by ``crop_boxes`` from the image
sizes alone, so the CPU path (``decode_image`` and ``crop_flip`` on one image in a worker, ``normalise`` on the
training device) and the GPU path (``torchvision.io.decode_jpeg`` on CUDA, then ``augment_batch`` on the whole
batch) crop the same boxes and flip the same samples. The crop is resized as torchvision resizes uint8 images
(bilinear, antialiased, rounded to uint8): on the CPU by torch's uint8 kernel, 3-4x faster than resizing in float
(0.3-0.4 against 1.2 ms for an ImageNet image, more than its decode), on a GPU in float, then rounded.

Evaluation: resize the shorter side to size / 0.875, centre crop, normalise.
"""
from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
UNIFORMS = 2 * ATTEMPTS + 4  # (area, log-ratio) per attempt, then top, left, flip, one spare
EVAL_CROP = 0.875
# what eval_transform does, as timm's pretrained_cfg keys (a trained model's config.json tells timm's data config)
EVAL_CFG = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": EVAL_CROP,
            "crop_mode": "center"}
JPEG_MAGIC = b"\xff\xd8"  # the first bytes of every JPEG file


# the first bytes of image formats, to say what a file PIL cannot identify was meant to be
_MAGIC = ((JPEG_MAGIC, "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WebP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def open_pil(data: bytes):
    """``PIL.Image.open`` of encoded bytes; for data it cannot identify an error with the data's size and what its
    first bytes say (a damaged JPEG, or not an image), where PIL names a BytesIO object."""
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        what = (f"it starts as a {kind} file: damaged or cut short" if kind else
                f"not an image format PIL reads: it starts {data[:8]!r}")
        raise UnidentifiedImageError(f"cannot identify image data ({len(data)} bytes; {what})") from None


def decode_pil(data: bytes) -> torch.Tensor:
    """An encoded image (JPEG, PNG, WebP, ...) as a (3, H, W) uint8 tensor, through PIL (grey, 16-bit grey, palette,
    CMYK and alpha images converted to RGB). Raises whatever PIL raises on a broken file (:func:`open_pil`)."""
    with open_pil(data) as image:
        if image.mode.startswith("I;16") or image.mode == "I":
            # 16-bit grey (PNG): convert("RGB") clips every value above 255, most of the image white; its top 8 bits
            grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=-1)
        else:
            rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def decode_image(data: bytes) -> torch.Tensor:
    """An encoded image as a (3, H, W) uint8 tensor, as the loaders decode every sample on the CPU: a JPEG by
    torchvision's libjpeg-turbo decoder (about twice as fast as through PIL: 0.44 against 0.84 ms for an ImageNet
    image; grey and CMYK converted to RGB as PIL does, the same pixels in the tests), any other image, and a JPEG it
    rejects, by :func:`decode_pil` (whose error names what is wrong with a broken file)."""
    if data[:2] == JPEG_MAGIC:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            pass
    return decode_pil(data)


def decode_jpeg(data, device="cpu"):
    """``torchvision.io.decode_jpeg`` to RGB (one uint8 tensor of JPEG bytes, or a list of them), without the
    DeprecationWarning torchvision 0.29 gives at every call (its decoders move to TorchCodec; the pinned 0.29 has
    them), which would stop a run under ``-W error``."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return torchvision_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def crop_boxes(u, heights, widths):
    """(B, UNIFORMS) uniforms and image sizes -> (B, 4) int64 boxes (top, left, height, width) and (B,) bool flips:
    torchvision's RandomResizedCrop.get_params, driven by the given uniforms instead of torch's RNG. The ten tries
    are computed at once (a loader worker calls this per sample, where numpy's per-call cost is what counts)."""
    u = np.asarray(u, dtype=np.float64)
    H, W = np.asarray(heights, dtype=np.int64)[:, None], np.asarray(widths, dtype=np.int64)[:, None]
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    area = H * W * (SCALE[0] + u[:, 0:2 * ATTEMPTS:2] * (SCALE[1] - SCALE[0]))  # (B, ATTEMPTS)
    aspect = np.exp(log_lo + u[:, 1:2 * ATTEMPTS:2] * (log_hi - log_lo))
    w = np.round(np.sqrt(area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first, found = ok.argmax(1), ok.any(1)  # the first try that fits
    rows = np.arange(len(u))
    H, W = H[:, 0], W[:, 0]
    # fallback: the largest centre crop whose ratio is within RATIO
    ratio = W / H
    fall_h = np.where(ratio < RATIO[0], np.round(W / RATIO[0]), H).astype(np.int64)
    fall_w = np.where(ratio > RATIO[1], np.round(H * RATIO[1]), W).astype(np.int64)
    boxes = np.empty((len(u), 4), dtype=np.int64)
    boxes[:, 2] = np.where(found, h[rows, first], fall_h)
    boxes[:, 3] = np.where(found, w[rows, first], fall_w)
    top = np.floor(u[:, 2 * ATTEMPTS] * (H - boxes[:, 2] + 1)).astype(np.int64)
    left = np.floor(u[:, 2 * ATTEMPTS + 1] * (W - boxes[:, 3] + 1)).astype(np.int64)
    boxes[:, 0] = np.where(found, top, (H - boxes[:, 2]) // 2)
    boxes[:, 1] = np.where(found, left, (W - boxes[:, 3]) // 2)
    return boxes, u[:, 2 * ATTEMPTS + 2] < 0.5


def _resize_uint8(image: torch.Tensor, size) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, *size) uint8, bilinear with antialiasing, by torch's uint8 kernel (CPU only; it works
    on channels-last images). Back to (3, H, W) layout through numpy, whose transposing copy of uint8 is about 3x
    faster than torch's (0.05 against 0.16 ms at 224 px)."""
    x = image[None].contiguous(memory_format=torch.channels_last)
    hwc = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0)
    return torch.from_numpy(np.ascontiguousarray(hwc.numpy().transpose(2, 0, 1)))


def _resize_float(image: torch.Tensor, size) -> torch.Tensor:
    """:func:`_resize_uint8` computed in float32 and rounded, for devices without a uint8 antialiased kernel."""
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    """The uint8 resize of the image's device."""
    return (_resize_uint8 if image.device.type == "cpu" else _resize_float)(image, size)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device):
    """ImageNet's (3, 1, 1) mean and std in [0, 255] on ``device``, made once: copying them to a GPU at every batch
    would make the training loop wait for the GPU's queued work (a copy from pageable memory synchronises)."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1) * 255,
            torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1) * 255)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 or float in [0, 255] -> ImageNet-normalised float32."""
    mean, std = _mean_std(x.device)
    return (x.float() - mean) / std


def crop_flip(images, u, size: int) -> torch.Tensor:
    """Decoded (3, H_i, W_i) uint8 images of any sizes (one device) and their (B, UNIFORMS) keyed uniforms ->
    a (B, 3, size, size) uint8 batch: random resized crop, flip. The CPU loader's workers stop here, so that a
    quarter of the bytes float32 would take crosses to the trainer (and to the GPU), where ``normalise`` runs."""
    boxes, flips = crop_boxes(u, [im.shape[1] for im in images], [im.shape[2] for im in images])
    crops = [_resize(im[:, t:t + h, l:l + w], (size, size)) for im, (t, l, h, w) in zip(images, boxes)]
    return torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])


def augment_batch(images, u, size: int) -> torch.Tensor:
    """:func:`crop_flip`, then :func:`normalise`: a (B, 3, size, size) float32 batch."""
    return normalise(crop_flip(images, u, size))


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size): shorter side to round(size / 0.875), centre crop, normalise."""
    _, H, W = image.shape
    short = int(round(size / EVAL_CROP))
    h, w = (short, max(short, W * short // H)) if H <= W else (max(short, H * short // W), short)
    resized = _resize(image, (h, w))
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))  # torchvision's centre
    return normalise(resized[:, top:top + size, left:left + size])
