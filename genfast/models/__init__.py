"""genfast.models: model classes built on genfast's fast paths, each with a fast/reference
switch (``model.set_backend(None | "reference" | ...)``, see ``FastPathModel``)."""
from ._base import FastPathModel
from .gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGAN, MLPGenerator
from .gpt import GPT, GPTConfig
from .stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator, r1_penalty
from .unet import DiffusionPipeline, UNet2D
from .vae import VAE

__all__ = ["FastPathModel", "VAE", "MLPGAN", "MLPGenerator", "MLPDiscriminator", "DCGANGenerator",
           "DCGANDiscriminator", "StyleGAN2Generator", "StyleGAN2Discriminator", "r1_penalty",
           "GPT", "GPTConfig", "UNet2D", "DiffusionPipeline"]
