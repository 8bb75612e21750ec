"""genfast.models: model classes built on genfast's fast paths, each with a fast/reference
switch (``model.set_backend(None | "reference" | ...)``, see ``FastPathModel``)."""
from ._base import FastPathModel
from .gan import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGAN, MLPGenerator
from .vae import VAE

__all__ = ["FastPathModel", "VAE", "MLPGAN", "MLPGenerator", "MLPDiscriminator", "DCGANGenerator",
           "DCGANDiscriminator"]
