"""earl: the Python package behind the earl-pipeline Snakemake workflow.

One module per pipeline step (``data``, ``vq``, ``text_tokenizer``, ``tokenize``, ...), each runnable as
``python -m earl.<step>``, plus the core they share: the Emu3 token layout (:mod:`earl.layout`), the
config models (:mod:`earl.config`), versioned artifacts (:mod:`earl.artifacts`) and image/VQ helpers.
"""

__version__ = "0.1.0"
