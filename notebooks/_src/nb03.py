# Source of notebooks/03_classifier.ipynb (see notebooks/build.py).
# %% [markdown]
# # 03 · A calibrated classifier with optax and jsoftmax
#
# This notebook walks through what `jsoftmax-train` does, one step at a time:
#
# 1. load scikit-learn's handwritten digits (bundled, no download) into train / validation /
#    test splits;
# 2. define a small MLP in plain JAX;
# 3. write the jitted training step with jsoftmax's cross-entropy and optax's Adam, and see
#    `vmap` compute per-example losses;
# 4. train and plot the curves;
# 5. fit a temperature on the validation set (temperature scaling) and compare reliability
#    diagrams before and after.
#
# The packages implement; the notebook shows. Everything imported from `jsoftmax_demo.train`
# (the example, apart from the library) and `jsoftmax.calibration` is a few dozen lines you
# can read there.
# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jsoftmax
from jsoftmax.calibration import expected_calibration_error, fit_temperature, reliability_bins
from jsoftmax_demo.train import init_mlp, load_dataset, mlp_apply, train

print("backend:", jax.default_backend(), "devices:", jax.devices())
# %% [markdown]
# ## 1. Data
#
# 1797 grey-scale 8x8 images of the digits 0 to 9, split 60 / 20 / 20 by a seeded
# permutation and standardised with the training split's statistics.
# %%
data = load_dataset("digits", seed=0)
print({k: v.shape for k, v in data._asdict().items() if hasattr(v, "shape")})
print("classes:", data.num_classes)
# %% [markdown]
# ## 2. The model
#
# Two ReLU hidden layers and a linear output layer; the outputs are logits, one per class.
# `init_mlp` draws He-normal weights; `mlp_apply` is three matrix products.
# %%
params = init_mlp(jax.random.key(0), [64, 128, 128, data.num_classes])
print([tuple(w.shape) for w, _ in params])
logits = mlp_apply(params, data.x_train[:4])
print("logits of 4 images:", logits.shape)
# %% [markdown]
# ## 3. The loss and the jitted step
#
# `softmax_cross_entropy_with_integer_labels` is a drop-in for optax's function of the same
# name. The step below is the whole training algorithm: loss, gradient, Adam update, under
# one `jax.jit`.
# %%
optimizer = optax.adam(3e-3)


def loss_fn(params, x, y):
    logits = mlp_apply(params, x)
    return jnp.mean(jsoftmax.softmax_cross_entropy_with_integer_labels(logits, y))


@jax.jit
def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


opt_state = optimizer.init(params)
x0, y0 = jnp.asarray(data.x_train[:64]), jnp.asarray(data.y_train[:64])
for i in range(3):
    params, opt_state, loss = step(params, opt_state, x0, y0)
    print(f"step {i}: loss {float(loss):.4f}")
# %% [markdown]
# The loss functions are batched already, but `vmap` turns any single-example function into
# a batched one. Here is the per-example loss written for one image and mapped over 64:
# %%
def single_example_loss(params, x, y):  # x: (64,), y: ()
    return jsoftmax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y)


per_example = jax.vmap(single_example_loss, in_axes=(None, 0, 0))(params, x0, y0)
batched = jsoftmax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x0), y0)
print(per_example.shape, "max difference from the batched call:",
      float(jnp.max(jnp.abs(per_example - batched))))
# %% [markdown]
# ## 4. Training
#
# `jsoftmax_demo.train.train` runs the same step over shuffled mini-batches for a number of epochs
# (and shards each batch over the local devices when there are several). We train for 40
# epochs here.
# %%
params, history = train(data, epochs=40, batch_size=64, learning_rate=3e-3, hidden=128, seed=0)
epochs = [r["epoch"] for r in history]
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
for split in ("train", "val"):
    ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], label=split)
    ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in history], label=split)
ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log")
ax_acc.set(xlabel="epoch", ylabel="accuracy")
ax_acc.legend()
fig.tight_layout()
plt.show()
test_logits = mlp_apply(params, data.x_test)
print("test accuracy:", float(jnp.mean(jnp.argmax(test_logits, -1) == data.y_test)))
# %% [markdown]
# ## 5. Temperature scaling
#
# A network trained to low loss is usually over-confident: its top-class probability is higher
# than its accuracy. Temperature scaling (Guo et al., 2017) fixes this with one number: divide
# the logits by $t$ and choose $t$ to minimise the validation NLL. Accuracy cannot change
# (the argmax is the same for any $t > 0$), only the confidence does. `fit_temperature` takes
# gradients through jsoftmax's `temperature` argument.
#
# The expected calibration error (ECE) averages |accuracy - confidence| over 15 confidence
# bins, weighted by how many test examples fall in each.
# %%
val_logits = mlp_apply(params, data.x_val)
t = float(fit_temperature(val_logits, data.y_val))
print(f"fitted temperature: {t:.3f}")
for name, temp in [("before", 1.0), ("after", t)]:
    nll = jnp.mean(jsoftmax.softmax_cross_entropy_with_integer_labels(
        test_logits, data.y_test, temperature=temp))
    probs = jsoftmax.softmax(test_logits, temperature=temp)
    ece = expected_calibration_error(probs, data.y_test, 15)
    print(f"{name:6s}: test NLL {float(nll):.4f}, ECE {float(ece):.4f}")
# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80, sharey=True)
for ax, (name, temp) in zip(axes, [("before", 1.0), ("after", t)]):
    bins = reliability_bins(jsoftmax.softmax(test_logits, temperature=temp), data.y_test, 15)
    filled = np.asarray(bins.counts) > 0
    left = np.asarray(bins.edges[:-1])[filled]
    ax.bar(left, np.asarray(bins.accuracy)[filled], width=1 / 15, align="edge",
           edgecolor="black", label="accuracy")
    ax.plot(np.asarray(bins.confidence)[filled], np.asarray(bins.accuracy)[filled], "r.",
            label="(confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(title=f"{name}: t = {temp:.2f}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
axes[0].set_ylabel("accuracy")
axes[0].legend(loc="upper left", fontsize="small")
fig.tight_layout()
plt.show()
# %% [markdown]
# Points below the diagonal are over-confident bins. With so few test images (360) and an
# accurate model, most examples sit in the last bin, so ECE is noisy; the NLL is the more
# reliable of the two numbers.
#
# ## Where next
#
# * Run the same pipeline from the command line: `jsoftmax-train --out runs/digits` writes
#   `metrics.json`, the training curves and the reliability diagrams; `--dataset spirals`
#   switches to a synthetic 3-class problem, `--platform gpu` to a GPU.
# * `01_softmax_numerics.ipynb` and `02_temperature.ipynb` explain the functions used here.
