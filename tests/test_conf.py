"""Every config in conf/ composes, and each group's ``_target_`` builds what it says (tiny where needed)."""

import copy
import functools
import importlib.util
import re
import tempfile
import warnings

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import get_object, instantiate
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

import zo2_lightning
from zo2_lightning.config import compose, find_conf_dir, instantiate_each
from zo2_lightning.tasks.lm_task import LMTask
from zo2_lightning.models import byte_tokenizer
from zo2_lightning.policies import PrecisionPolicy
from zo2_lightning.tasks import PromptDataModule, SyntheticDataModule, TextFileDataModule

CONF = find_conf_dir()
RUN_DIR = tempfile.mkdtemp(prefix="zo2_conf_test_")
GROUPS = ["model", "tuning", "precision", "offload", "optimizer", "scheduler", "task", "module", "trainer",
          "logger", "callbacks", "paths", "experiment", "hparams_search"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml")) if not p.stem.startswith("_")]
TINY = ["tiny", "llama_tiny", "qwen_tiny", "roberta_tiny"]
PUBLISHED = {  # nominal parameter counts of the published shapes
    "opt-125m": 125e6, "opt-350m": 350e6, "opt-1.3b": 1.3e9, "opt-2.7b": 2.7e9, "opt-6.7b": 6.7e9,
    "opt-13b": 13e9, "opt-30b": 30e9, "opt-66b": 66e9, "opt-175b": 175e9, "llama2-7b": 6.7e9,
    "qwen2.5-7b": 7.6e9, "roberta-large": 355e6,
}


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...], config_name: str = "train"):
    return compose(config_name, list(overrides), output_dir=RUN_DIR)


def cfg_for(*overrides: str, config_name: str = "train"):
    """A composed config (cached: composing takes ~0.3 s), copied so tests can change it."""
    return copy.deepcopy(_composed(tuple(overrides), config_name))


def test_option_names_follow_one_rule():
    """Lower case words joined by underscores (``bf16_mixed``, ``cpu_overlap``); model options keep the hub's
    spelling of a model's name (``opt-1.3b``, ``roberta-large``)."""
    bad = [f"{g}={o}" for g, o in OPTIONS if g != "model" and not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", o)]
    assert not bad


def test_every_group_is_covered():
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    assert {o for g, o in OPTIONS if g == "model"} == {*TINY, *PUBLISHED, "local"}


EVAL_OPTIONS = [("model", "opt-13b"), ("task", "sst2"), ("task", "squad"), ("offload", "cpu_overlap")]


@pytest.mark.parametrize(
    "group,option,config_name", [(g, o, "train") for g, o in OPTIONS] + [(g, o, "eval") for g, o in EVAL_OPTIONS]
)
def test_every_option_composes_and_resolves(group, option, config_name):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "local"):
        overrides.append("model.name_or_path=/some/dir")
    if (group, option) == ("task", "textfile"):
        overrides.append("task.path=corpus.txt")
    cfg = cfg_for(*overrides, config_name=config_name)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["paths"]["output_dir"] == RUN_DIR


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_build_for_real_and_run_a_forward(name):
    bundle = instantiate(cfg_for(f"model={name}").model, _convert_="all")
    assert sum(p.numel() for p in bundle.model.parameters()) < 1e6
    ids = bundle.tokenizer("hello" + (bundle.tokenizer.mask_token if name == "roberta_tiny" else ""),
                           return_tensors="pt").input_ids
    assert bundle.model(input_ids=ids).logits.shape[-1] == bundle.model.config.vocab_size
    zo2_lightning.engine.discover_blocks(bundle.model)  # the strategy finds its blocks


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_shapes_build_on_the_meta_device(name):
    cfg = cfg_for(f"model={name}").model
    cfg.init = "random"
    with torch.device("meta"):
        bundle = instantiate(cfg, _convert_="all")
    n = sum(p.numel() for p in bundle.model.parameters())
    assert n == pytest.approx(PUBLISHED[name], rel=0.12)


def test_hub_entries_also_load_a_local_directory(tmp_path):
    bundle = instantiate(cfg_for("model=tiny").model, _convert_="all")
    bundle.model.save_pretrained(tmp_path / "saved")
    bundle.tokenizer.save_pretrained(tmp_path / "saved")
    for overrides in (["model=local"], ["model=opt-125m"]):
        cfg = cfg_for(*overrides).model
        cfg.name_or_path = str(tmp_path / "saved")
        loaded = instantiate(cfg, _convert_="all")
        assert cfg.init == "pretrained" and len(loaded.tokenizer) == len(bundle.tokenizer)
        for a, b in zip(loaded.model.parameters(), bundle.model.parameters()):
            assert torch.equal(a, b)


OPTIMIZERS = [o for g, o in OPTIONS if g == "optimizer"]


@pytest.mark.parametrize("model", TINY)
def test_every_tiny_model_has_its_own_lr_for_every_optimizer(model):
    """A preset per (model, optimizer) pair (conf/optimizer/model_preset/MODEL/OPTIMIZER.yaml), each shown to
    converge by benchmarks/model_presets.py; one lr for all of them diverged with momentum."""
    for optimizer in OPTIMIZERS:
        preset = OmegaConf.load(CONF / "optimizer" / "model_preset" / model / f"{optimizer}.yaml")
        assert cfg_for(f"model={model}", f"optimizer={optimizer}").optimizer.lr == preset.lr
    lrs = {o: cfg_for(f"model={model}", f"optimizer={o}").optimizer.lr for o in OPTIMIZERS}
    assert lrs["zo_sgd_mmt"] == pytest.approx(lrs["zo_sgd"] / 10)  # momentum 0.9 sums ~10 updates


def test_real_models_keep_the_optimizers_own_lr_and_an_override_wins():
    assert cfg_for("model=tiny").optimizer.lr == 3e-3
    assert cfg_for("model=opt-13b").optimizer.lr == 1e-6
    assert cfg_for("model=opt-13b", "optimizer=zo_adam").optimizer.lr == 1e-5
    assert cfg_for("model=tiny", "optimizer=zo_adam", "optimizer.lr=1e-4").optimizer.lr == 1e-4


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "precision"])
def test_precision_policies(option):
    policy = instantiate(cfg_for(f"precision={option}").precision)
    assert isinstance(policy, PrecisionPolicy) and policy.trainer_precision in ("32-true", "bf16-mixed", "bf16-true")
    strategy_cls = zo2_lightning.ZO2OffloadStrategy
    kwargs = policy.strategy_kwargs()
    assert ("storage_dtype" in kwargs) == (policy.storage_dtype is not None)
    assert all(isinstance(v, torch.dtype) for v in kwargs.values())
    strategy = strategy_cls(**kwargs)  # the strategy takes what the policy gives it
    assert strategy.engine_options.storage_dtype == kwargs.get("storage_dtype")


def test_unsupported_trainer_precision_is_refused():
    with pytest.raises(ValueError, match="precision=fp32"):
        PrecisionPolicy("16-mixed")


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "offload"])
def test_offload_options_build_the_strategy(option):
    cfg = cfg_for(f"offload={option}").offload
    assert isinstance(instantiate(cfg), zo2_lightning.ZO2OffloadStrategy)
    assert cfg.seed == 42 and (cfg.offload_device is None) == (option == "none")
    assert cfg.perturbation_parallel == 1  # data parallel unless asked


def test_perturbation_parallel_from_the_command_line():
    cfg = cfg_for("trainer=ddp", "trainer.devices=4", "offload=cpu_overlap", "offload.perturbation_parallel=2")
    assert instantiate(cfg.offload).perturbation_parallel == 2 and cfg.trainer.devices == 4


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "scheduler"])
def test_optimizer_and_schedulers(option):
    cfg = cfg_for(f"scheduler={option}")
    cfg.trainer.max_steps = 10  # the schedules end at trainer.max_steps
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, zo2_lightning.ZOSGD) and optimizer.param_groups[0]["lr"] == 3e-3
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the schedule alone is checked
        for _ in range(10):
            scheduler.step()
    expected = 3e-3 if option == "constant" else 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "task"])
def test_tasks_build_their_datamodule(option, tmp_path):
    cfg = cfg_for(f"task={option}").task
    if option == "textfile":
        (tmp_path / "corpus.txt").write_text("some text " * 1000)
        cfg.path = str(tmp_path / "corpus.txt")
    kwargs = {} if option == "synthetic" else {"tokenizer": byte_tokenizer()}
    dm = instantiate(cfg, **kwargs, _convert_="all")
    expected = {"synthetic": SyntheticDataModule, "textfile": TextFileDataModule}.get(option, PromptDataModule)
    assert isinstance(dm, expected)
    if option in ("synthetic", "textfile"):
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        assert batch["kind"] == "lm" and batch["input_ids"].shape[0] == cfg.batch_size


def test_module_builds_the_lightning_module():
    cfg = cfg_for()
    bundle = instantiate(cfg.model, _convert_="all")
    module = instantiate(cfg.module, model=bundle.model, tokenizer=bundle.tokenizer,
                         optimizer=instantiate(cfg.optimizer), scheduler=None)
    assert isinstance(module, LMTask) and isinstance(module, zo2_lightning.ZOModule)
    assert isinstance(module.configure_optimizers(), zo2_lightning.ZOSGD)


# ids spelled out: tests/conftest.py skips any test with a bare "gpu" keyword on a machine without CUDA
@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "trainer"], ids=lambda o: f"trainer-{o}")
def test_trainers(option):
    cfg = cfg_for(f"trainer={option}").trainer
    expected_accelerator = "gpu" if option in ("gpu", "ddp") else "cpu"
    assert cfg.accelerator == expected_accelerator
    # build every one on this CPU machine (a GPU trainer would refuse to start without CUDA)
    trainer = instantiate(cfg, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, Trainer) and trainer.max_steps == cfg.max_steps


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "logger"])
def test_loggers(option):
    if option in ("tensorboard", "many") and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        pytest.skip("tensorboard is an optional extra")
    loggers = instantiate_each(cfg_for(f"logger={option}").get("logger"))
    assert len(loggers) == {"none": 0, "many": 2}.get(option, 1)
    for logger in loggers:
        assert RUN_DIR in logger.log_dir


def test_default_callbacks():
    callbacks = instantiate_each(cfg_for().callbacks)
    names = sorted(type(c).__name__ for c in callbacks)
    assert names == ["ModelCheckpoint", "SizeReport", "ThroughputMemoryMonitor", "_RichBar"]
    # trainer=debug turns the bar off, and Lightning refuses a bar callback then: the entry builds nothing
    assert "_RichBar" not in [type(c).__name__ for c in instantiate_each(cfg_for("trainer=debug").callbacks)]
    with_lr = instantiate_each(cfg_for("callbacks=[default,lr_monitor]").callbacks)
    assert "LearningRateMonitor" in [type(c).__name__ for c in with_lr]


def _with_hydra(overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_hparams_search_defines_a_basic_sweep():
    cfg = _with_hydra(["hparams_search=mezo_grid"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["optimizer.lr"] == "1e-6,1e-7"


def test_the_slurm_launcher_config():
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is an optional extra (zo2_lightning[slurm])")
    cfg = _with_hydra(["hydra/launcher=slurm"])
    assert get_object(cfg.hydra.launcher._target_).__name__ == "SlurmLauncher"
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("name", [o for g, o in OPTIONS if g == "experiment"])
def test_experiments_state_their_setting(name):
    cfg = cfg_for(f"experiment={name}")
    assert cfg.task_name == name and cfg.trainer.accelerator == "gpu"
    first_line = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()[1]
    assert first_line.startswith("# python -m zo2_lightning.train experiment=" + name)



@pytest.mark.parametrize("override,needle", [("trainer.max_steps=abc", "trainer.max_steps must be a number"),
                                             ("seed=abc", "seed must be an integer")])
def test_numeric_overrides_given_as_text_name_the_fix(override, needle):
    from zo2_lightning.train import build

    with pytest.raises(ValueError, match=needle):
        build(cfg_for(override))


def test_the_default_config_passes_the_type_check():
    from zo2_lightning.config import check_types

    check_types(cfg_for())


def test_the_zo_methods_sweep_runs_every_optimizer_config():
    """hparams_search=zo_methods is the one sweep over every ZO optimizer: a config added to conf/optimizer/ and not
    to the sweep fails here."""
    cfg = _with_hydra(["hparams_search=zo_methods"])
    swept = cfg.hydra.sweeper.params["optimizer"].split(",")
    assert sorted(swept) == sorted(o for g, o in OPTIONS if g == "optimizer")
