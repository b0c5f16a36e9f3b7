"""The image crops I2VGen-XL expects, shared by the sampler and the UI's crop preview."""

from __future__ import annotations

from PIL import Image


def center_crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale the image to cover width x height (box filter), then cut out the centre.

    This mirrors I2VGen-XL's reference transform (`_center_crop_wide` in the original repo and in
    diffusers), floor division included, so our inputs match the reference pipeline's to the pixel.
    """
    scale = min(image.width / width, image.height / height)
    image = image.resize((round(image.width // scale), round(image.height // scale)), resample=Image.BOX)
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def clip_input(image: Image.Image, width: int, size: int) -> Image.Image:
    """What the CLIP image encoder sees: a width x width centre crop, resized bilinearly to size x size."""
    return center_crop_resize(image, width, width).resize((size, size), Image.BILINEAR)
