"""Image-to-Video: a local app around the I2VGen-XL diffusion model."""

__version__ = "0.1.0"
