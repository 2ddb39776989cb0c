"""The softmax-bottleneck demo: softmax vs MoS of one hidden size on the synthetic corpus.

The corpus is a random first-order Markov chain whose log-transition matrix has full
rank V; a softmax head of size d can only produce log-probability matrices of rank at
most d + 2 (d + 1 without its bias), MoS can go far beyond. `mos-jax demo` trains both
heads with this config, which is `mos_jax.demo.demo_config()` (kept in the package so
the installed command finds it); see that function for the choices.
"""

from mos_jax.demo import demo_config


def get_config():
    return demo_config()
