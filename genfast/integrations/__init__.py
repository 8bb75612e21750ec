"""genfast inside the libraries its users run (transformers, diffusers). Each submodule imports its
library lazily, so importing genfast never needs them."""
