"""mos-jax: AWD-LSTM with a Mixture-of-Softmaxes output layer, in JAX/Flax."""

from mos_jax.errors import MosJaxError

__version__ = "0.1.0"
__all__ = ["MosJaxError", "__version__"]
