"""Evaluate a model with lm-evaluation-harness (`lm-eval`), through our own OpenAI-compatible server.

    results = evaluate(llm, "smollm2", ["evals/llama3_facts.yaml"], limit=8)

Nothing here re-implements lm-eval: the model is served in-process on a free 127.0.0.1 port
(the same `create_app` as `llama3 serve`), and lm-eval's own `local-completions` backend (or
`local-chat-completions` with chat=True) talks to it, tokenizing through our /tokenize.  So an
evaluation here and one against a running `llama3 serve` are the same requests.

Tasks: lm-eval task names (its registry), or paths to task YAML files; a YAML's relative
`data_files` are read relative to the YAML's folder (so the repository's evals/ run from anywhere).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from llama3.errors import Llama3Error


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread (`url`; `stop()`)."""

    def __init__(self, app, start_timeout: float = 30.0):
        import uvicorn

        from llama3.server import Server

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise Llama3Error("the evaluation server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def task_config(task: str | dict):
    """A task name stays a name; a YAML file becomes lm-eval's dict config with data paths made absolute
    (a dict is already a config)."""
    if isinstance(task, dict):
        return task
    path = Path(task)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return task
    if not path.is_file():
        raise Llama3Error(f"{task}: no such task file")
    import yaml  # PyYAML, an lm-eval dependency

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:  # one line is enough
        raise Llama3Error(f"{task}: not a readable task YAML ({type(error).__name__}: {error})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise Llama3Error(f"{task}: a task YAML is a mapping with at least 'task:' (lm-eval's task format); "
                          "tasks using !function tags: pass their folder's task name with lm_eval --include_path")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        for split, name in files.items():
            local = path.parent / str(name)
            if not os.path.isabs(str(name)) and local.exists():
                files[split] = str(local.resolve())
    return config


def evaluate(llm, model_name: str, tasks: list[str | dict], *, chat: bool = False, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """Run lm-eval's simple_evaluate on `tasks` against `llm` served in-process; lm-eval's results dict."""
    try:
        import lm_eval
    except ImportError:
        raise Llama3Error("evaluation needs lm-evaluation-harness: pip install lm-eval "
                          "(or pip install -e '.[eval]')") from None
    from llama3.server import create_app

    from lm_eval.tasks import TaskManager

    configs = [task_config(t) for t in tasks]
    # Indexing lm-eval's ~14,000 built-in task files takes 20-30 s here; only task names need it.
    manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs))
    server = BackgroundServer(create_app(llm, model_name))
    try:
        backend = "local-chat-completions" if chat else "local-completions"
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        model_args = {"base_url": server.url + endpoint, "model": model_name,
                      "max_length": llm.config.max_seq_len, "tokenizer_backend": None if chat else "remote"}
        if not chat:
            model_args["batch_size"] = batch_size
        try:
            results = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=configs, limit=limit,
                                              num_fewshot=num_fewshot, apply_chat_template=chat,
                                              log_samples=log_samples, bootstrap_iters=0, task_manager=manager)
        except ModuleNotFoundError as error:
            raise Llama3Error(f"lm-eval's API backends need more packages ({error.name}): "
                              "pip install 'lm-eval[api]'") from None
        except (KeyError, ValueError) as error:  # e.g. an unknown task name
            raise Llama3Error(f"lm-eval refused the tasks {tasks}: {error}") from None
    finally:
        server.stop()
    if results is None:
        raise Llama3Error("lm-eval returned no results")
    return results
