"""The README's offline commands, with the Hub switched off: a local directory's architecture with random weights
(config.json is all it reads) trained on a task from local files. Loading a directory's weights is
tests/test_conf.py's ``test_hub_entries_also_load_a_local_directory``."""

import torch
from hydra.utils import instantiate

from tests.run_helpers import compose_run
from zo2_lightning.config import compose
from zo2_lightning.tasks.toy_data import write_toy_task
from zo2_lightning.train import train


def test_init_random_reads_only_the_directorys_config_and_trains_on_local_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = instantiate(compose("train", ["model=tiny"], output_dir=tmp_path).model, _convert_="all").model
    saved.config.num_hidden_layers = 2  # a shape the configs do not have: it can only come from the directory
    (tmp_path / "model").mkdir()
    saved.config.to_json_file(tmp_path / "model" / "config.json")  # no weights, no tokenizer files
    data = write_toy_task("sst2", tmp_path / "data" / "sst2", n_train=40, n_valid=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only spins on a busy 2-core machine
    try:
        metrics, objects = train(compose_run(tmp_path, [
            "model=local", f"model.name_or_path={tmp_path / 'model'}", "model.init=random",
            "task=sst2", f"task.data_dir={data}", "task.num_train=32", "task.num_dev=8", "trainer=debug"]))
    finally:
        torch.set_num_threads(threads)
    assert objects["trainer"].global_step == 4 and "val/acc" in metrics
    assert len(objects["model"].model.decoder.layers) == 2
