"""A tiny LightningModule over the tiny HF models, and a quiet CPU Trainer, for the strategy tests."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
from torch.utils.data import DataLoader

from tests import tiny_models
from zo2_lightning import ZO2OffloadStrategy, ZOModule, ZOSGD

SEED = 1234


class TinyTask(ZOModule, L.LightningModule):
    """A tiny HF model's LM loss, trained by ``optimizer(params, lr=, eps=, weight_decay=, **optimizer_kwargs)``
    (ZOSGD by default; ``q=2``, ``one_sided=True``, ``momentum=0.9``, ... go to the optimizer)."""

    def __init__(self, arch: str = "opt", lr: float = 1e-3, eps: float = 1e-3, weight_decay: float = 0.0,
                 scheduler: Any = None, model: torch.nn.Module | None = None, optimizer: type[ZOSGD] = ZOSGD,
                 **optimizer_kwargs: Any) -> None:
        super().__init__()
        self.model = model if model is not None else tiny_models.build(arch)[0]
        self.model.train()  # as a user's model would be; the strategy turns dropout off for the ZO forwards
        self.lr, self.eps, self.weight_decay, self.scheduler = lr, eps, weight_decay, scheduler
        self.optimizer_cls, self.optimizer_kwargs = optimizer, optimizer_kwargs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = tiny_models.loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", tiny_models.loss(self.model, batch))

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return tiny_models.logits(self.model, batch)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_cls(self.parameters(), lr=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                                 **self.optimizer_kwargs)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


class TwoGroupTask(TinyTask):
    """TinyTask with two param groups: the blocks (``"layers"``) at ``lr=1e-2``, the rest at ``lr=2e-3``, under
    ``optimizer_cls`` (ZOSGD, ZOAdam, ...)."""

    def __init__(self, arch: str, optimizer_cls: type) -> None:
        super().__init__(arch, optimizer=optimizer_cls)

    def configure_optimizers(self) -> Any:
        head = [p for n, p in self.named_parameters() if "layers" not in n]
        body = [p for n, p in self.named_parameters() if "layers" in n]
        return self.optimizer_cls([{"params": body}, {"params": head, "lr": 2e-3}], lr=1e-2, eps=self.eps)


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def zo_strategy(force_copies: bool = True, seed: int = SEED, **kwargs: Any) -> ZO2OffloadStrategy:
    """``ZO2OffloadStrategy(seed=seed, **kwargs)``; ``force_copies``: the host<->device copy path, as on a GPU."""
    return ZO2OffloadStrategy(seed=seed, force_copies=force_copies, **kwargs)


def trainer(force_copies: bool = True, seed: int = SEED, strategy: Any = None, **kwargs: Any) -> L.Trainer:
    if strategy is None:
        strategy = zo_strategy(force_copies, seed)
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(strategy=strategy, **defaults)


def clone_model(task: TinyTask) -> torch.nn.Module:
    return copy.deepcopy(task.model)


def assert_params_equal(model: torch.nn.Module, expected: torch.nn.Module, initial: torch.nn.Module | None = None) -> None:
    """Bitwise equal parameters; with ``initial``, also check that training moved every trainable one."""
    if initial is not None:
        for (n, p), (_, q) in zip(model.named_parameters(), initial.named_parameters()):
            assert not p.requires_grad or not torch.equal(p, q), f"{n} did not change: the test would prove nothing"
    for (n, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"


def resume_against_uninterrupted(make_task: Any, batches: list[dict], tmp_path: Any, steps: int = 4,
                                 at: int = 2) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, dict]:
    """Fit ``make_task()`` for ``steps`` steps; fit another from the same start with a checkpoint at step ``at`` (an
    epoch's end: the loaders are not resumable mid-epoch) and resume a third from it to ``steps``. Returns the
    resumed model, the uninterrupted one, the start, and the checkpoint's zo2 entry."""
    uninterrupted = make_task()
    initial = clone_model(uninterrupted)
    trainer(max_steps=steps).fit(uninterrupted, loader(batches))
    first = make_task()
    first.model.load_state_dict(initial.state_dict())
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1, filename="{step}")
    trainer(max_steps=at + 1, enable_checkpointing=True, callbacks=[ckpt]).fit(first, loader(batches))
    path = tmp_path / f"step={at}.ckpt"
    saved = torch.load(path, weights_only=True)["zo2_lightning"]
    resumed = make_task()
    trainer(max_steps=steps).fit(resumed, loader(batches), ckpt_path=path)
    return resumed.model, uninterrupted.model, initial, saved
