"""Published protocols, as run settings, and the numbers they reported.

Each preset fixes everything but the scenario, the method and the seed. ``si_lambda``
may be a per-scenario mapping (the strengths c that the authors chose per scenario);
``si_importance`` and ``si_clamp``, where given, are the SIPlugin variant of the authors'
code (the command line's ``--si-importance`` / ``--si-clamp`` override them).
"""

from __future__ import annotations

PRESETS = {
    # The demo: real data that needs no download (scikit-learn's 8x8 digits), minutes on a CPU.
    "digits": dict(benchmark="split-digits", hidden=(100, 100), lr=1e-3, batch_size=32,
                   iterations=300, si_eps=0.1, si_lambda={"task": 10.0, "domain": 10.0, "class": 0.5}),
    # van de Ven & Tolias 2019, "Three scenarios for continual learning", split MNIST.
    "vandeven-split-mnist": dict(benchmark="split-mnist", hidden=(400, 400), lr=1e-3,
                                 betas=(0.9, 0.999), batch_size=128, iterations=2000, si_eps=0.1,
                                 si_lambda={"task": 50.0, "domain": 500.0, "class": 0.5}),
    # ... and permuted MNIST (32x32 inputs, 10 tasks, all permuted).
    "vandeven-permuted-mnist": dict(benchmark="permuted-mnist", hidden=(1000, 1000), lr=1e-4,
                                    betas=(0.9, 0.999), batch_size=128, iterations=5000, pad=2,
                                    n_tasks=10, si_eps=0.1,
                                    si_lambda={"task": 5.0, "domain": 5.0, "class": 0.1}),
    # Zenke, Poole & Ganguli 2017, permuted MNIST: 784-2000-2000, 20 epochs per task, Adam
    # not reset. Their code (pathint/protocols.py, PATH_INT_PROTOCOL with omega_decay="sum")
    # measures ω with the gradient of the loss without the penalty ("unreg_grads") times the
    # step taken, and clamps the running total: Ω ← relu(Ω + ω / (Δ² + ξ)). Their Keras
    # Dense layers start Glorot-uniform with zero biases (init="glorot").
    "zenke-permuted-mnist": dict(benchmark="permuted-mnist", hidden=(2000, 2000), lr=1e-3,
                                 betas=(0.9, 0.999), batch_size=256, iterations=None, epochs=20,
                                 pad=0, n_tasks=10, si_eps=0.1, si_lambda=0.1,
                                 si_importance="task", si_clamp="total", init="glorot"),
}
# Loss plateaus (si-plateau): window, mean and variance thresholds chosen from Naive's
# training loss on seed 0 (never from test accuracy), replaying Aljundi et al.'s detector on
# it, so that it fires about once per context: a loss that settles near 0 within a context
# needs far lower thresholds than their toy problem's 0.2 and 0.1.
# Task-free streams after van de Ven's main_task_free.py (--stream fuzzy-boundaries; defaults
# from params/param_values.py with no_boundaries=True): contexts of 2000 (split) or 5000
# (permuted) mini-batches of 128, transitions ramped over 2 x 500 iterations, c = 10,
# xi = 0.1, consolidation every 100 iterations (--update-every); Task-IL through one output
# layer masked by the task label, as in his code. Methods: experiments/online.py.
PRESETS["vandeven-taskfree-split-mnist"] = dict(
    benchmark="split-mnist", stream="fuzzy", hidden=(400, 400), lr=1e-3, betas=(0.9, 0.999),
    batch_size=128, iterations=2000, fuzziness=500, si_eps=0.1, si_lambda=10.0,
    consolidate_every=100, task_head="shared", plateau=(100, 0.005, 5e-5))
PRESETS["vandeven-taskfree-permuted-mnist"] = dict(
    benchmark="permuted-mnist", stream="fuzzy", hidden=(1000, 1000), lr=1e-4,
    betas=(0.9, 0.999), batch_size=128, iterations=5000, pad=2, n_tasks=10, fuzziness=500,
    si_eps=0.1, si_lambda=10.0, consolidate_every=100, task_head="shared")
# Avalanche's online split MNIST: split_online_stream(experience_size=10), one pass, batch
# 10, the boundaries hidden (access_task_boundaries=False) but for si-boundary.
PRESETS["avalanche-online-split-mnist"] = dict(
    benchmark="split-mnist", stream="online", experience_size=10, hidden=(400, 400), lr=1e-3,
    betas=(0.9, 0.999), batch_size=10, iterations=None, si_eps=0.1, si_lambda=10.0,
    consolidate_every=100, task_head="shared", plateau=(100, 0.1, 0.005))

# The Fashion-MNIST counterparts use the MNIST protocols unchanged (no published SI number).
PRESETS["vandeven-split-fmnist"] = dict(PRESETS["vandeven-split-mnist"], benchmark="split-fmnist")
PRESETS["vandeven-permuted-fmnist"] = dict(PRESETS["vandeven-permuted-mnist"],
                                           benchmark="permuted-fmnist")

# Mean accuracy (%) over all tasks after the last one; (mean, SEM or None).
PUBLISHED = {
    ("vandeven-split-mnist", "task", "si"): (99.09, 0.1),
    ("vandeven-split-mnist", "domain", "si"): (65.36, 1.2),
    ("vandeven-split-mnist", "class", "si"): (19.99, None),
    ("vandeven-split-mnist", "task", "naive"): (87.19, None),
    ("vandeven-split-mnist", "domain", "naive"): (59.21, None),
    ("vandeven-split-mnist", "class", "naive"): (19.90, None),
    ("vandeven-split-mnist", "task", "joint"): (99.64, None),
    ("vandeven-split-mnist", "domain", "joint"): (98.41, None),
    ("vandeven-split-mnist", "class", "joint"): (97.93, None),
    ("vandeven-permuted-mnist", "task", "si"): (94.75, None),
    ("vandeven-permuted-mnist", "domain", "si"): (95.33, None),
    ("vandeven-permuted-mnist", "class", "si"): (29.31, None),
    ("vandeven-permuted-mnist", "task", "naive"): (81.79, None),
    ("vandeven-permuted-mnist", "domain", "naive"): (78.51, None),
    ("vandeven-permuted-mnist", "class", "naive"): (17.26, None),
    ("zenke-permuted-mnist", "domain", "si"): (96.9, None),
    ("zenke-permuted-mnist", "domain", "naive"): (57.4, None),  # c = 0
}
