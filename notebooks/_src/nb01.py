# Source of notebooks/01_softmax_numerics.ipynb: cells separated by "# %%" markers
# ("# %% [markdown]" for prose). Rebuild with: python notebooks/build.py
# %% [markdown]
# # 01 · Softmax numerics: overflow, log-softmax, masks and low precision
#
# Softmax is five lines in every course and a source of NaNs in every codebase. In this
# notebook you will:
#
# 1. watch a naive softmax produce tiny numbers, then NaN;
# 2. see why subtracting the maximum fixes it *exactly*;
# 3. compute log-softmax through logsumexp instead of `log(softmax(x))`;
# 4. handle masks and fully-masked rows without NaN values or NaN gradients;
# 5. sum a long bfloat16 row to 1;
#
# and compare `jsoftmax` with `jax.nn` on each of these edges.
# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jsoftmax

np.set_printoptions(precision=4, suppress=False)
# %% [markdown]
# ## 1. The naive softmax
#
# $\mathrm{softmax}(x)_i = e^{x_i} / \sum_j e^{x_j}$, written literally in NumPy (float32):
# %%
def naive_softmax(x):
    e = np.exp(np.asarray(x, np.float32))
    return e / e.sum()


with np.errstate(over="ignore", invalid="ignore"):
    print(naive_softmax([10, 2, 40, 4]))
    print(naive_softmax([10, 2, 10000, 4]))
# %% [markdown]
# With a largest entry of 40 the result is still right, but the small probabilities are
# already around $e^{-36} \approx 10^{-16}$. With 10000, `exp` overflows to `inf` and
# `inf / inf` is NaN: the whole row is lost, although the answer is obviously `[0, 0, 1, 0]`.
#
# ## 2. The max-shift identity
#
# For any constant $c$,
# $$\frac{e^{x_i - c}}{\sum_j e^{x_j - c}} = \frac{e^{-c}\,e^{x_i}}{e^{-c}\sum_j e^{x_j}} = \frac{e^{x_i}}{\sum_j e^{x_j}}.$$
# The factor $e^{-c}$ cancels exactly, so shifting changes nothing mathematically. Choosing
# $c = \max_j x_j$ makes every exponent $\le 0$ (no overflow) and makes the largest term exactly
# $e^0 = 1$, so the denominator is at least 1 (no division by zero, no total underflow).
# %%
def shifted_softmax(x):
    x = np.asarray(x, np.float32)
    e = np.exp(x - x.max())
    return e / e.sum()


print(shifted_softmax([10, 2, 10000, 4]))
print(jsoftmax.softmax(jnp.array([10.0, 2.0, 10000.0, 4.0])))
print(jax.nn.softmax(jnp.array([10.0, 2.0, 10000.0, 4.0])))
# %% [markdown]
# ## 3. Log-softmax through logsumexp
#
# Taking the log of a softmax throws information away: probabilities below about 1e-38 are 0 in
# float32, and $\log 0 = -\infty$. The log-domain formula never leaves the log domain:
# $$\log \mathrm{softmax}(x)_i = x_i - m - \log \sum_j e^{x_j - m}, \qquad m = \max_j x_j.$$
# %%
x = jnp.array([10.0, 2.0, 10000.0, 4.0])
print("log(softmax(x)):", jnp.log(jsoftmax.softmax(x)))
print("log_softmax(x): ", jsoftmax.log_softmax(x))
print("logsumexp(x):   ", jsoftmax.logsumexp(x))
# %% [markdown]
# The gap matters for training: a cross-entropy on `log(softmax)` gives `inf` loss and NaN
# gradients once a logit gap exceeds about 87 (e^-87 is float32's smallest normal number;
# XLA flushes smaller ones to zero). The plot shows the log-probability of the smaller
# of two logits as the gap grows: the naive route falls off a cliff at the float32 limit.
# %%
gaps = np.linspace(0, 200, 401, dtype=np.float32)
pairs = jnp.stack([jnp.zeros_like(gaps), -gaps], axis=-1)
naive = jnp.log(jsoftmax.softmax(pairs))[:, 1]
stable = jsoftmax.log_softmax(pairs)[:, 1]
fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
ax.plot(gaps, stable, label="log_softmax (jsoftmax)")
ax.plot(gaps, jnp.where(jnp.isfinite(naive), naive, np.nan), "--", label="log(softmax)")
ax.set_xlabel("logit gap")
ax.set_ylabel("log-probability of the smaller logit")
ax.legend()
fig.tight_layout()
plt.show()
# %% [markdown]
# ## 4. Masks and fully-masked rows
#
# Padding tokens and invalid actions are masked out. A row can be *entirely* masked (an empty
# sequence in a batch). What should its softmax be? `jsoftmax` defines it as all zeros
# (log-softmax all `-inf`, logsumexp `-inf`) with **zero gradients**, because that row carries
# no information.
# %%
logits = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
mask = jnp.array([[True, True, False], [False, False, False]])
print("jsoftmax:", jsoftmax.softmax(logits, where=mask))
print("jax.nn:  ", jax.nn.softmax(logits, where=mask))


def masked_loss(fn, x):
    ls = fn(x, where=mask)
    return jnp.sum(jnp.where(mask, ls, 0.0))


print("grad jsoftmax:", jax.grad(lambda x: masked_loss(jsoftmax.log_softmax, x))(logits))
print("grad jax.nn:  ", jax.grad(lambda x: masked_loss(jax.nn.log_softmax, x))(logits))
# %% [markdown]
# With an explicit `where`, current `jax.nn` agrees on this row. The difference shows when the
# masking arrives as `-inf` logits (a common way to mask before calling softmax), and at `+inf`.
# Entries equal to `-inf` are excluded the same way as `where=False`, and entries equal to `+inf` take the
# limit: they share the mass of their row. A NaN makes its own row NaN and leaves the others
# alone.
# %%
edge = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [1.0, jnp.inf, jnp.inf], [1.0, jnp.nan, 0.0]])
print("jsoftmax:\n", jsoftmax.softmax(edge))
print("jax.nn:\n", jax.nn.softmax(edge))
# %% [markdown]
# ## 5. Low precision
#
# bfloat16 keeps 8 significant bits. Summing 50,000 small probabilities in bfloat16 drifts:
# every partial sum is rounded to 8 bits, and the normaliser inherits that error. `jsoftmax` computes in float32 and rounds each result once, so the row still sums to 1
# to within bfloat16 rounding.
# %%
row = (jax.random.normal(jax.random.key(0), (50_000,)) * 3).astype(jnp.bfloat16)


def bf16_softmax(x):  # everything in bfloat16, including the sum
    e = jnp.exp(x - jnp.max(x))
    return e / jnp.sum(e, dtype=jnp.bfloat16)


for name, probs in [("all-bf16", bf16_softmax(row)), ("jsoftmax", jsoftmax.softmax(row))]:
    print(f"{name:9s} dtype={probs.dtype}  sum={float(jnp.sum(probs.astype(jnp.float32))):.5f}")
# %% [markdown]
# ## Where next
#
# * `02_temperature.ipynb`: temperature from the hard max to uniform, smooth maxima, sampling.
# * `03_classifier.ipynb`: an optax classifier trained with jsoftmax's cross-entropy, then
#   calibrated with temperature.
# * The README's *Edge cases* table lists every edge above for jsoftmax and `jax.nn`.
