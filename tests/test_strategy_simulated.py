"""The equivalence matrix of the strategy, run on the simulated asynchronous device across scheduler seeds.

Each configuration is fitted through ``Trainer(strategy=ZO2OffloadStrategy(simulated_device=seed, ...))`` and compared,
bitwise, with the same fit on synchronous copies (``force_copies``), which the rest of the suite holds to the
in-memory MeZO reference. A representative slice runs by default; ``pytest -m slow -k simulated`` runs the whole
matrix.
"""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests import tiny_models
from tests.lit_helpers import TinyTask, assert_params_equal, clone_model, loader, trainer, zo_strategy

SEEDS = (0, 1, 2)
ARCH = "llama"  # 3 blocks
LR = 5e-3

#: configuration -> (strategy options, optimizer options, batch size)
MATRIX = {
    "prefetch0": (dict(prefetch=0), {}, 2),
    "prefetch1": (dict(prefetch=1), {}, 2),
    "prefetch3": (dict(prefetch=3), {}, 2),
    "slots-prefetch+1": (dict(prefetch=1, device_slots=2), {}, 2),
    "slots-prefetch+2": (dict(prefetch=1, device_slots=3), {}, 2),
    "regenerate": (dict(prefetch=1, device_slots=2, regenerate_directions=True), {}, 2),
    "split-least-memory": (dict(prefetch=1, device_slots=2, regenerate_directions=True, split_blocks=True), {}, 2),
    "keep": (dict(prefetch=0, keep_directions=True), {}, 2),
    "resident-fixed": (dict(prefetch=0, resident_blocks=1), {}, 2),
    "resident-auto": (dict(prefetch=0, resident_blocks="auto", max_gpu_memory=1 << 20), {}, 2),
    "micro-batches": (dict(prefetch=0, micro_batches=2), {}, 4),
    "q2": (dict(prefetch=1), dict(q=2), 2),
    "bf16-storage": (dict(prefetch=0, storage_dtype="bf16"), {}, 2),
    "disk": (dict(prefetch=0, offload_device="disk"), {}, 2),  # offload_dir: a temporary directory per run
}
DEFAULT_SLICE = ("slots-prefetch+1",)


def _fit(name, seed, steps=4, tmp_path=None):
    kwargs, opt_kwargs, batch_size = MATRIX[name]
    if name == "disk":
        kwargs = dict(kwargs, offload_dir=str(tmp_path / f"blocks{seed}"))
    task = TinyTask(ARCH, lr=LR, **opt_kwargs)
    initial = clone_model(task)
    where = dict(force_copies=True) if seed is None else dict(simulated_device=seed)
    trainer(strategy=zo_strategy(**where, **kwargs), max_steps=steps).fit(
        task, loader(tiny_models.batches(ARCH, steps, batch_size=batch_size)))
    return task.model, initial


def _equal_across_seeds(name, seeds, tmp_path=None):
    expected, initial = _fit(name, None, tmp_path=tmp_path)
    for seed in seeds:
        got, _ = _fit(name, seed, tmp_path=tmp_path)
        assert_params_equal(got, expected, initial)


@pytest.mark.parametrize("name", DEFAULT_SLICE)
def test_simulated_fit_equals_synchronous_copies(name):
    _equal_across_seeds(name, SEEDS[:2])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_simulated_fit_equals_synchronous_copies_whole_matrix(name, tmp_path):
    _equal_across_seeds(name, SEEDS, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_simulated_checkpoint_mid_fit_and_resume_equal_the_uninterrupted_fit(seed, tmp_path):
    batches = tiny_models.batches(ARCH, 2)
    strategy = dict(simulated_device=seed, prefetch=1, device_slots=2)
    uninterrupted = TinyTask(ARCH, lr=LR)
    initial = clone_model(uninterrupted)
    trainer(strategy=zo_strategy(**strategy), max_steps=4).fit(uninterrupted, loader(batches))

    first = TinyTask(ARCH, lr=LR, model=clone_model(TinyTask(model=initial)))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(strategy=zo_strategy(**strategy), max_steps=3, enable_checkpointing=True, callbacks=[ckpt]).fit(
        first, loader(batches))
    resumed = TinyTask(ARCH, lr=LR)
    trainer(strategy=zo_strategy(**strategy), max_steps=4).fit(resumed, loader(batches),
                                                               ckpt_path=tmp_path / "step=2.ckpt")
    assert_params_equal(resumed.model, uninterrupted.model, initial)


@pytest.mark.parametrize("seed", SEEDS[:1])
def test_simulated_validation_and_predict_stream_the_current_weights(seed):
    batches = tiny_models.batches("opt", 2)
    task = TinyTask("opt", lr=LR)
    synchronous = TinyTask("opt", lr=LR, model=clone_model(task))
    fitted = {}
    for name, t, where in (("sim", task, dict(simulated_device=seed)), ("sync", synchronous, {})):
        tr = trainer(strategy=zo_strategy(prefetch=0, **where), max_steps=2, val_check_interval=1,
                     limit_val_batches=1)
        tr.fit(t, loader(batches), loader(batches))
        fitted[name] = (float(tr.callback_metrics["val_loss"]),
                        trainer(strategy=zo_strategy(prefetch=0, **where)).predict(t, loader(batches)))
    assert fitted["sim"][0] == fitted["sync"][0]
    for got, want in zip(fitted["sim"][1], fitted["sync"][1]):
        assert torch.equal(got, want)
