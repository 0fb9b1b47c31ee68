"""The training example that ships with jsoftmax, apart from the library.

:mod:`jsoftmax_demo.train` is the ``jsoftmax-train`` command (also
``python -m jsoftmax_demo.train``): an MLP classifier trained with optax on
jsoftmax's cross-entropy, then calibrated with temperature scaling. It needs
the ``demo`` extra (optax, scikit-learn, matplotlib, tqdm); ``import jsoftmax``
needs none of them.
"""
