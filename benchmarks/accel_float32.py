"""Float32 numerics on any backend, for the accelerator check's test runs.

`model.compute_dtype` "auto" means bfloat16 on a GPU or TPU, and most numeric tests
leave it at "auto": their NumPy tolerances are float32 ones. Imported first (as a pytest
plugin, `-p accel_float32`, or before running a test worker), this module makes "auto"
resolve to float32 in this process, so the tests check the compiled float32 programs
on the device. Explicit dtypes ("bfloat16" in the mixed-precision tests) are untouched.
Pair it with `JAX_DEFAULT_MATMUL_PRECISION=highest`: otherwise float32 matmuls on
recent NVIDIA GPUs may run as TF32.
"""

import jax.numpy as jnp

from mos_jax import model

_dtype = getattr(model.ModelConfig, "dtype", None)
if not isinstance(_dtype, property):
    raise RuntimeError(
        "benchmarks/accel_float32.py expects mos_jax.model.ModelConfig.dtype to be the "
        "property that resolves compute_dtype 'auto'; update this plugin to where the "
        "resolution now lives")


def _float32_auto(self):
    if self.compute_dtype == "auto":
        return jnp.dtype("float32")
    return _dtype.fget(self)


model.ModelConfig.dtype = property(_float32_auto, doc=_dtype.__doc__)
