"""Time-series forecasting on the Mackey-Glass delay differential equation (chaotic for ``tau = 17``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jbptt.batch import Batch
from jbptt.tasks import Task, check_split, register_task, regression_metrics


@functools.lru_cache(maxsize=4)
def mackey_glass_series(
    n: int = 12000,
    tau: float = 17.0,
    beta: float = 0.2,
    gamma: float = 0.1,
    power: float = 10.0,
    dt: float = 0.1,
    x0: float = 1.2,
    discard: int = 500,
):
    """The Mackey-Glass series ``dx/dt = beta x(t - tau) / (1 + x(t - tau)^power) - gamma x(t)``.

    Integrated with 4th-order Runge-Kutta at step ``dt`` (the delayed term linearly interpolated from the
    stored history, constant ``x0`` before time 0), sampled every time unit, with the first ``discard``
    samples dropped.

    Returns:
      ``[n]`` float64 numpy array (deterministic).
    """
    sub = int(round(1.0 / dt))
    lag = int(round(tau / dt))
    total = (n + discard) * sub
    x = np.empty(total + 1)
    x[0] = x0

    def delayed(i):  # x at time (i - lag) * dt, with constant history before 0
        return x[i - lag] if i >= lag else x0

    def f(xt, xd):
        return beta * xd / (1.0 + xd**power) - gamma * xt

    for i in range(total):
        xd0, xd1 = delayed(i), delayed(i + 1)
        xdh = 0.5 * (xd0 + xd1)
        k1 = f(x[i], xd0)
        k2 = f(x[i] + 0.5 * dt * k1, xdh)
        k3 = f(x[i] + 0.5 * dt * k2, xdh)
        k4 = f(x[i] + dt * k3, xd1)
        x[i + 1] = x[i] + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x[::sub][discard : discard + n]


@register_task("mackey_glass")
def mackey_glass(
    length: int = 100, horizon: int = 1, washout: int = 10, tau: float = 17.0, dtype: str = "float32"
) -> Task:
    """Predict the Mackey-Glass series ``horizon`` steps ahead from windows of ``length`` steps.

    The 12,000-sample series is standardised (train mean and std) and cut into train (first 70%), validation
    (next 15%) and test (last 15%) stretches. Batches: inputs ``[B, T, 1]`` = ``x[t]``, targets
    ``[B, T, 1]`` = ``x[t + horizon]``, ``mask`` 0 for the first ``washout`` steps of each window (the state
    warms up).
    Loss ``mse``; headline metric ``nrmse`` (RMSE divided by the targets' standard deviation).
    """
    if length <= washout or washout < 0 or horizon < 1:
        raise ValueError(
            f"mackey_glass needs 0 <= washout < length and horizon >= 1, got length={length}, "
            f"washout={washout}, horizon={horizon}"
        )
    series = mackey_glass_series(tau=float(tau))
    n = len(series)
    bounds = {"train": (0, int(0.7 * n)), "val": (int(0.7 * n), int(0.85 * n)), "test": (int(0.85 * n), n)}
    lo, hi = bounds["train"]
    mean, std = series[lo:hi].mean(), series[lo:hi].std()
    data = jnp.asarray((series - mean) / std, dtype)
    offsets = jnp.arange(length)

    def sample(key, batch_size: int, split: str = "train"):
        check_split(split)
        lo, hi = bounds[split]
        starts = jax.random.randint(key, (batch_size,), lo, hi - length - horizon + 1)
        idx = starts[:, None] + offsets[None]
        mask = (offsets >= washout).astype(dtype)[None].repeat(batch_size, 0)
        return Batch(data[idx][..., None], data[idx + horizon][..., None], mask)

    return Task(
        "mackey_glass",
        1,
        1,
        "mse",
        sample,
        regression_metrics,
        "nrmse",
        False,
        {"seq_len": length, "horizon": horizon, "mean": float(mean), "std": float(std)},
    )
