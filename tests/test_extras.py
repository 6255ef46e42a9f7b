"""Install what you use: the core package runs without the extras, and a command whose extra is missing
says which `pip install 'llama3[...]'` to run, in one line, with exit status 2."""

import subprocess
import sys
import tomllib

import pytest

from train_helpers import REPO

# Runs in a fresh interpreter with the named top-level modules made unimportable, as if not installed.
BLOCKED_PYTHON = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
exec(sys.argv[2])
"""

OPTIONAL = "fastapi,uvicorn,pydantic,starlette,matplotlib,bible"


def without(modules: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_PYTHON, modules, code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_the_core_and_torch_is_a_range():
    core = {d.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip().lower() for d in pyproject()["dependencies"]}
    # huggingface-hub: `hf:ORG/NAME` downloads; `tokenizers` requires it anyway, so it adds nothing to an install
    assert core == {"torch", "numpy", "safetensors", "gguf", "tiktoken", "tokenizers", "jinja2", "tqdm", "llama-models",
                    "huggingface-hub"}
    torch_spec = next(d for d in pyproject()["dependencies"] if d.startswith("torch"))
    assert "==" not in torch_spec and ">=2" in torch_spec       # a user's CUDA build of another 2.x stays
    extras = pyproject()["optional-dependencies"]
    assert {"serve", "train", "plot", "all", "dev"} <= set(extras)
    assert extras["all"] == ["llama3[plot,serve,train]"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert '"torch==2.13.0"' in setup and '".[all]"' in setup and '".[all,dev]"' in setup  # the pin lives here only


def test_the_core_imports_and_generates_without_any_extra(tmp_path):
    code = f"""
import sys, torch
import llama3, llama3.cli, llama3.generate, llama3.fast, llama3.tokenizer, llama3.train, llama3.inspect.trace
from llama3.checkpoint import save_checkpoint
from llama3.config import ModelConfig
from llama3.llm import LLM
from llama3.model import Transformer
config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=48, max_seq_len=32)
save_checkpoint(LLM(model=Transformer(config).init_weights(seed=0), config=config), {str(tmp_path / 'm')!r}, format="hf")
llm = llama3.load({str(tmp_path / 'm')!r})
print(llm.model(torch.tensor([[1, 2, 3]])).shape)
print(sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL.split(",")!r}))
"""
    result = without(OPTIONAL, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["torch.Size([1, 3, 64])", "[]"]


@pytest.mark.parametrize("blocked, argv, extra", [
    ("fastapi,uvicorn", ["serve", "--port", "1"], "serve"),
    ("fastapi,uvicorn", ["lab", "--port", "1"], "serve"),
    ("matplotlib", ["inspect", "rope", "--out", "rope.png"], "plot"),
    ("bible", ["train", "--out", "{tmp}/run", "--steps", "1"], "train"),
    ("matplotlib", ["sft", "--data", "{tmp}/chats.jsonl", "--out", "{tmp}/sft"], "train"),
])
def test_a_missing_extra_is_one_line_naming_the_install_command(tmp_path, blocked, argv, extra):
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = without(blocked, f"import sys; from llama3.cli import main; sys.exit(main({argv!r}))")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"pip install 'llama3[{extra}]'" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before it wrote anything
