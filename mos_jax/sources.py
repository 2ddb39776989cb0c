"""One path from a corpus source string to a `Corpus`: `load_corpus`.

The sources:

- `synthetic`: the built-in Markov chain (`mos_jax.data.synthetic_corpus`);
- `tfds:NAME[:FEATURE]`: a TensorFlow Datasets text dataset (`mos_jax.tfds_corpus`,
  imported only for such a source, since it imports `tensorflow_datasets`);
- anything else: a directory with train.txt, valid.txt and test.txt
  (`mos_jax.data.read_corpus`).

The dispatch lives here, above both `mos_jax.data` and `mos_jax.tfds_corpus` (which
builds its corpora with `data`), so that neither of them imports the other backwards.
"""

from __future__ import annotations

from mos_jax import data
from mos_jax.data import Corpus

TFDS_PREFIX = "tfds:"


def load_corpus(source: str, **kwargs) -> Corpus:
    """The corpus of `source`; keyword arguments go to the source's reader
    (`data.synthetic_corpus`, `tfds_corpus.load_tfds_corpus`, `data.read_corpus`)."""
    if source == "synthetic":
        return data.synthetic_corpus(**kwargs)
    if source.startswith(TFDS_PREFIX):
        from mos_jax import tfds_corpus  # lazy: imports tensorflow_datasets
        return tfds_corpus.load_tfds_corpus(source[len(TFDS_PREFIX):], **kwargs)
    return data.read_corpus(source, **kwargs)
