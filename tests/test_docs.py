"""The docs match the code: the README's option tables list exactly the options the code declares, and nothing in
the repository cites a file outside it."""

import inspect
import re
import subprocess
from pathlib import Path

from zo2_lightning.engine import EngineOptions
from zo2_lightning.strategy import ZO2OffloadStrategy
from zo2_lightning.strategy.zo2_offload import STEP_OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def _table(name: str) -> list[str]:
    """The option names of the README table between ``<!-- name ... -->`` and ``<!-- /name -->``, in order."""
    text = (ROOT / "README.md").read_text()
    body = re.search(rf"<!-- {name}\b.*?-->(.*?)<!-- /{name} -->", text, re.S)
    assert body is not None, f"README.md has no {name} table"
    return re.findall(r"^\| `(\w+)` \|", body.group(1), re.M)


def test_the_readme_lists_every_engine_option_in_declaration_order():
    assert _table("engine-options") == list(EngineOptions.names())


def test_the_readme_lists_every_step_option_the_strategy_takes():
    params = inspect.signature(ZO2OffloadStrategy).parameters
    assert set(STEP_OPTIONS) <= set(params)
    assert _table("step-options") == list(STEP_OPTIONS)


def test_nothing_cites_a_file_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    cited = [f for f in files if f.endswith((".py", ".md", ".yaml", ".toml", ".sh", ".cfg", ".txt"))
             and f != "tests/test_docs.py" and (ROOT / f).is_file()
             and re.search(r"\b(DESIGN|STYLE)\.md\b|\.\./shared/", (ROOT / f).read_text(errors="ignore"))]
    assert not cited, f"these cite design notes that are not in the repository: {cited}"
