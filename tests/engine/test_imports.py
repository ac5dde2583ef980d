import subprocess
import sys


def test_engine_imports_neither_lightning_nor_hydra():
    code = (
        "import sys, zo2_lightning.engine as e;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
