# Source of notebooks/02_temperature.ipynb (see notebooks/build.py).
# %% [markdown]
# # 02 · Temperature: from the hard max to uniform
#
# Dividing logits by a temperature $t$ before the softmax is how language models trade
# accuracy for diversity and how classifiers get calibrated. In this notebook you will:
#
# 1. sweep $t$ from 0 (the hard max) to $\infty$ (uniform) on `[38, 20, 40, 39]`;
# 2. plot the entropy of the distribution as a function of $t$;
# 3. use logsumexp with temperature as a smooth maximum;
# 4. differentiate with respect to $t$;
# 5. sample with temperature, top-k and top-p, and with Gumbel-softmax, and check the draws
#    against the distribution they should follow.
# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jsoftmax

np.set_printoptions(precision=4, suppress=True)
logits = jnp.array([38.0, 20.0, 40.0, 39.0])
# %% [markdown]
# ## 1. The temperature sweep
#
# $\mathrm{softmax}(x / t)$: small $t$ sharpens, large $t$ flattens. The two ends are limits,
# and `jsoftmax` returns them exactly: `temperature=0` is the one-hot argmax (ties shared) and
# `temperature=inf` is uniform, with no division by zero anywhere.
# %%
for t in [0.0, 0.001, 0.5, 1.0, 2.0, 10.0, 100.0, jnp.inf]:
    print(f"t = {float(t):>7}: {np.asarray(jsoftmax.softmax(logits, temperature=t))}")
# %% [markdown]
# ## 2. Entropy against temperature
#
# The entropy $H = -\sum_i p_i \log p_i$ climbs from 0 (one-hot) to $\log 4 \approx 1.386$
# (uniform). `jsoftmax.entropy` computes it from the logits, where the formula by hand meets
# 0 * log 0 at small $t$. We compute it for many temperatures at once: `temperature` accepts
# one value per row, so a batch of identical rows with different temperatures is one call.
# %%
temps = jnp.logspace(-2, 3, 200)
rows = jnp.broadcast_to(logits, (temps.size, logits.size))
entropy = jsoftmax.entropy(rows, temperature=temps)
print("t = 0:  ", float(jsoftmax.entropy(logits, temperature=0.0)), "(one-hot)")
print("t = inf:", float(jsoftmax.entropy(logits, temperature=jnp.inf)), "= log 4")
fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
ax.semilogx(temps, entropy)
ax.axhline(np.log(4), ls=":", c="gray", label="log 4 (uniform)")
ax.set_xlabel("temperature t")
ax.set_ylabel("entropy (nats)")
ax.legend()
fig.tight_layout()
plt.show()
# %% [markdown]
# ## 3. logsumexp as a smooth maximum
#
# $t \log \sum_i e^{x_i / t}$ lies between $\max_i x_i$ and $\max_i x_i + t \log n$: it tends to
# the maximum as $t \to 0$, and is differentiable everywhere for $t > 0$ (its gradient is the
# softmax). `temperature=0` gives the maximum exactly.
# %%
for t in [10.0, 1.0, 0.1, 0.01, 0.0]:
    print(f"t = {t:>5}: smooth max = {float(jsoftmax.logsumexp(logits, temperature=t)):.6f}")
# %% [markdown]
# ## 4. The gradient with respect to temperature
#
# The temperature is an ordinary differentiable argument. The derivative of the smooth
# maximum with respect to $t$ is the entropy of the softmax (differentiate
# $t \log \sum_i e^{x_i/t}$), which we can check against the entropy computed directly:
# %%
t = 2.0
dlse_dt = jax.grad(lambda t: jsoftmax.logsumexp(logits, temperature=t))(t)
print("d logsumexp / dt:", float(dlse_dt))
print("entropy at t=2:  ", float(jsoftmax.entropy(logits, temperature=t)))
print("d softmax / dt:  ", jax.jacfwd(lambda t: jsoftmax.softmax(logits, temperature=t))(t))
# %% [markdown]
# ## 5. Sampling
#
# `jsoftmax.sample` draws one index per slice from $\mathrm{softmax}(x/t)$, optionally keeping
# only the `top_k` largest logits or the smallest set whose probability reaches `top_p`
# (nucleus sampling). We draw 20,000 samples with `vmap` over keys and compare the frequencies
# with the distribution they should follow.
# %%
keys = jax.random.split(jax.random.key(0), 20_000)


def frequencies(**kwargs):
    draws = jax.vmap(lambda k: jsoftmax.sample(k, logits, **kwargs))(keys)
    return np.bincount(np.asarray(draws), minlength=logits.size) / draws.size


settings = {
    "t=2": dict(temperature=2.0),
    "t=2, top_k=2": dict(temperature=2.0, top_k=2),
    "t=2, top_p=0.7": dict(temperature=2.0, top_p=0.7),
}
fig, axes = plt.subplots(1, 3, figsize=(9, 2.6), dpi=80, sharey=True)
for ax, (name, kw) in zip(axes, settings.items()):
    target = np.asarray(jsoftmax.softmax(logits, temperature=kw["temperature"]))
    if "top_k" in kw:
        keep = np.argsort(-target)[: kw["top_k"]]
        target = np.where(np.isin(np.arange(4), keep), target, 0) / target[keep].sum()
    if "top_p" in kw:
        order = np.argsort(-target)
        cum = np.cumsum(target[order])
        keep = order[: np.searchsorted(cum, kw["top_p"]) + 1]
        target = np.where(np.isin(np.arange(4), keep), target, 0) / target[keep].sum()
    ax.bar(np.arange(4) - 0.2, frequencies(**kw), width=0.4, label="draws")
    ax.bar(np.arange(4) + 0.2, target, width=0.4, label="distribution")
    ax.set_title(name)
    ax.set_xticks(range(4))
axes[0].legend()
fig.tight_layout()
plt.show()
print("greedy (t=0):", set(np.asarray(jax.vmap(
    lambda k: jsoftmax.sample(k, logits, temperature=0.0))(keys[:100])).tolist()))
# %% [markdown]
# ## 6. Gumbel-softmax
#
# Adding Gumbel noise to the logits and taking the argmax draws exactly from the softmax
# (the Gumbel-max trick). Replacing the argmax with a softmax at temperature $t$ gives a
# differentiable relaxation; `hard=True` returns the one-hot argmax in the forward pass and
# the relaxed sample's gradient in the backward pass (the straight-through estimator).
# %%
gkeys = keys[:5000]
small_logits = jnp.array([1.0, 0.0, 2.0, 0.5])
hard = jax.vmap(lambda k: jsoftmax.gumbel_softmax(k, small_logits, hard=True))(gkeys)
soft = jax.vmap(lambda k: jsoftmax.gumbel_softmax(k, small_logits, temperature=0.5))(gkeys)
print("argmax frequencies of hard samples:", np.asarray(hard.mean(axis=0)))
print("softmax(logits):                   ", np.asarray(jsoftmax.softmax(small_logits)))
print("a soft sample (t=0.5):             ", np.asarray(soft[0]))
grad = jax.grad(lambda x: jnp.sum(jsoftmax.gumbel_softmax(gkeys[0], x, hard=True) * jnp.arange(4.0)))
print("straight-through gradient:         ", np.asarray(grad(small_logits)))
# %% [markdown]
# ## Where next
#
# * `03_classifier.ipynb` fits a temperature to calibrate a trained classifier, with the
#   gradient in $t$ used here.
# * The README's *Losses and sampling* section lists the sampling and loss functions.
