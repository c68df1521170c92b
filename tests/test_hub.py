"""Model cards and pushing adapters to the Hub (`surgical_peft.hub`), against a local stand-in for the Hub API."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import build_model
from huggingface_hub import ModelCard
from peft import get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig
from surgical_peft.cli import main
from surgical_peft.errors import InputError
from surgical_peft.hub import BASE_MODEL_PLACEHOLDER, render_model_card

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub API routes `huggingface_hub` uses to create a repository, upload files in one commit and read a
    file back; every request is recorded in `server.requests`, every commit's files in `server.commits`."""

    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: object) -> None:
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        """`/api/whoami-v2`: the token's owner and role (`server.whoami`); `/{repo}/resolve/{revision}/{path}`: a file
        of the repository's last commit; 404 otherwise."""
        self.server.requests.append((self.command, self.path))
        if self.path.startswith("/api/whoami-v2"):
            return self._json(self.server.whoami)
        owner, name, route, _, *path = [*self.path.split("?")[0].strip("/").split("/"), "", "", "", ""]
        files = self.server.commits.get(f"{owner}/{name}", [{}])[-1]
        content = files.get("/".join(p for p in path if p)) if route == "resolve" else None
        if content is None:
            self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        else:
            self._reply(200, content, {"X-Repo-Commit": COMMIT, "ETag": f'"{hash(content)}"'})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append(("POST", self.path))
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            return self._json({"url": f"{endpoint}/{request['organization']}/{request['name']}"})
        if "/preupload/" in self.path:  # every file is sent inline (base64) in the commit
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in self.path and self.server.refuse_commits:
            return self._reply(403, b"{}", {"X-Error-Message": "commits are refused"})
        if "/commit/" in self.path:
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            lines = [json.loads(line) for line in body.splitlines()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
            self.server.commits.setdefault(repo, []).append(files)
            return self._json({"commitUrl": f"{endpoint}/{repo}/commit/{COMMIT}", "commitOid": COMMIT})
        return self._json({})  # e.g. /api/validate-yaml


@pytest.fixture
def hub() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests, server.commits, server.refuse_commits = [], {}, False
    server.whoami = {"name": "user", "auth": {"accessToken": {"role": "write"}}}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def front_matter(readme: bytes) -> dict:
    return ModelCard(readme.decode()).data.to_dict()


def test_card_front_matter_recipe_and_metrics() -> None:
    base = build_model("resnet-basic")
    base.name_or_path = "microsoft/resnet-18"
    model = get_peft_model(base, SurgicalConfig(block=["embedder", "stage1"]))
    card = render_model_card(
        model,
        shift="fog",
        dataset="uoft-cs/cifar10",
        recipe={"strategy": "surgical", "lr": 1e-3, "train_n": 200},
        metrics={"eval_accuracy": 0.87654},
        repo_id="me/resnet-fog",
    )
    assert front_matter(card.encode()) == {
        "base_model": "microsoft/resnet-18",
        "datasets": ["uoft-cs/cifar10"],
        "library_name": "peft",
        "pipeline_tag": "image-classification",
        "tags": [
            "surgical-fine-tuning",
            "block:embedder",
            "block:stage1",
            "shift:fog",
            "base_model:adapter:microsoft/resnet-18",
        ],
    }
    for line in ("# me/resnet-fog", "| lr | 0.001 |", "| train_n | 200 |", "| eval_accuracy | 0.8765 |"):
        assert line in card.splitlines()
    assert 'PeftModel.from_pretrained(base, "me/resnet-fog")' in card

    local = render_model_card(model, dataset=str(ROOT))  # a local dataset is described, not listed
    assert "datasets" not in front_matter(local.encode()) and "a local dataset" in local


def text_model(model_class: type[nn.Module], **config: object) -> nn.Module:
    """A tiny BERT or GPT-2 task model (offline)."""
    if model_class is transformers.GPT2LMHeadModel:
        return model_class(
            transformers.GPT2Config(
                vocab_size=20, n_embd=8, n_layer=2, n_head=1, bos_token_id=0, eos_token_id=0, **config
            )
        )
    return model_class(
        transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=1, **config)
    )


@pytest.mark.parametrize(
    ("make", "block", "pipeline_tag", "loader"),
    [
        (lambda: build_model("vit"), "layer1", "image-classification", "AutoModelForImageClassification"),
        (
            lambda: text_model(transformers.BertForSequenceClassification),
            "layer1",
            "text-classification",
            "AutoModelForSequenceClassification",
        ),
        (lambda: text_model(transformers.GPT2LMHeadModel), "layer2", "text-generation", "AutoModelForCausalLM"),
    ],
    ids=["vit", "bert", "gpt2"],
)
def test_card_follows_the_task(make: Callable[[], nn.Module], block: str, pipeline_tag: str, loader: str) -> None:
    base = make()
    base.name_or_path = "someone/base-model"
    card = render_model_card(get_peft_model(base, SurgicalConfig(block=block)), repo_id="me/adapter")
    assert front_matter(card.encode())["pipeline_tag"] == pipeline_tag
    assert front_matter(card.encode())["base_model"] == "someone/base-model"
    assert f"from transformers import {loader}\n" in card
    assert f'base = {loader}.from_pretrained("someone/base-model")' in card
    assert "AutoModelForImageClassification" not in card or pipeline_tag == "image-classification"


def test_card_license_labels_and_eval_size() -> None:
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    base = text_model(
        transformers.BertForSequenceClassification, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    base.name_or_path = "google-bert/bert-base-uncased"
    model = get_peft_model(base, SurgicalConfig(block="layer2"))
    card = render_model_card(model, metrics={"eval_accuracy": 0.5}, license="apache-2.0", eval_size=321)
    assert front_matter(card.encode())["license"] == "apache-2.0"
    assert "Labels (3): negative, neutral, positive." in card.splitlines()
    assert "Metrics measured on 321 evaluation examples." in card.splitlines()
    default = render_model_card(get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="head")))
    assert "Labels" not in default  # transformers' LABEL_0.. names say nothing
    assert "license" not in front_matter(default.encode()) and "evaluation examples" not in default


def test_local_base_warns_and_leaves_a_placeholder(tmp_path: Path) -> None:
    base = build_model("resnet-basic")
    base.name_or_path = str(tmp_path)  # trained from a local copy: no Hub id to name
    model = get_peft_model(base, SurgicalConfig(block="stage1"))
    with pytest.warns(UserWarning, match="local path"):
        card = render_model_card(model, repo_id="me/resnet-stage1")
    assert "base_model" not in front_matter(card.encode())
    assert f'AutoModelForImageClassification.from_pretrained("{BASE_MODEL_PLACEHOLDER}")' in card
    assert f"local path (`{tmp_path}`; **TODO**" in card
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render_model_card(model)  # a card for a local save only: no warning


# Run in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported.
PUSH_API = """
import sys, torch, surgical_peft
from peft import get_peft_model
from transformers import ResNetConfig, ResNetForImageClassification
from surgical_peft.hub import push_adapter

base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
base.name_or_path = "microsoft/resnet-18"
model = get_peft_model(base, surgical_peft.SurgicalConfig(block="stage1"))
print(push_adapter(model, "user/tiny-stage1", card={"metrics": {"eval_accuracy": 0.75}, "license": "mit"}))
"""


def test_push_adapter_renders_the_card_for_the_repository(hub: ThreadingHTTPServer, tmp_path: Path) -> None:
    # `card` as render_model_card's arguments: the card names the repository, its full id included.
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_TOKEN": "hf_test"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PUSH_API)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (repo,) = hub.commits
    readme = hub.commits[repo][0]["README.md"].decode()
    assert readme.count(f"# {repo}\n") == 1 and f'PeftModel.from_pretrained(base, "{repo}")' in readme
    assert "path/to/this/adapter" not in readme
    assert front_matter(readme.encode())["license"] == "mit" and "| eval_accuracy | 0.75 |" in readme


# Run in a fresh process: huggingface_hub reads HF_ENDPOINT when it is imported.
PUSH = """
import sys
import surgical_peft
from peft import PeftModel
from transformers import AutoModelForImageClassification
from surgical_peft.cli import main

model_dir, output = sys.argv[1], sys.argv[2]
argv = ["train", "--model", model_dir, "--block", "stage1", "--train-n", "20", "--eval-n", "10", "--epochs", "1"]
argv += ["--output-dir", output, "--no-progress", "--push-to-hub", "--hub-model-id", "user/tiny-stage1"]
assert main(argv) == 0

model = PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(model_dir), output + "/adapter")
model.push_to_hub("user/tiny-stage1")  # the repository's README.md (our card) is kept
model.push_to_hub("user/fresh")  # a new repository gets transformers' generic card
"""


def test_push_uploads_the_adapter_with_its_card(hub: ThreadingHTTPServer, tmp_path: Path) -> None:
    model = build_model("resnet-basic", num_labels=10)
    model.config.image_size = 32
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_TOKEN": "hf_test"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, "-c", textwrap.dedent(PUSH), str(tmp_path / "model"), str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the command line prints the URL of the commit huggingface_hub made (CommitInfo.commit_url)
    url = f"http://127.0.0.1:{hub.server_address[1]}/user/tiny-stage1/commit/{COMMIT}"
    assert f"Pushed to the Hub: {url}" in result.stdout.splitlines(), result.stdout
    assert ("POST", "/api/repos/create") in hub.requests

    first, second = hub.commits["user/tiny-stage1"]
    assert sorted(first) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    adapter = tmp_path / "run" / "adapter"
    assert first["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads(first["adapter_config.json"])["target_modules"] == ["resnet.encoder.stages.0"]
    card = front_matter(first["README.md"])
    assert card["library_name"] == "peft"
    assert {"surgical-fine-tuning", "block:stage1"} <= set(card["tags"])
    assert not any(tag.startswith("shift:") for tag in card["tags"])  # your own model: the data is not shifted
    assert first["README.md"].decode().count("# user/tiny-stage1") == 1
    assert b"| train_n | 20 |" in first["README.md"]

    # model.push_to_hub (PEFT via transformers) re-uploads the card the repository already has ...
    assert sorted(second) == sorted(first)
    assert front_matter(second["README.md"]) == card
    # ... but on a new repository it replaces even PEFT's own card with transformers' generic one (see hub.py).
    (fresh,) = hub.commits["user/fresh"]
    assert front_matter(fresh["README.md"])["library_name"] == "transformers"


def run_cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`surgical-peft ARGV` in a fresh process (huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported),
    with a token unless `env` says otherwise, online unless `env` says otherwise."""
    environment = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    environment.update(OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(cwd / "hf-home"))
    environment.update(env)
    command = [sys.executable, "-m", "surgical_peft.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=cwd)


def closed_port() -> int:
    """A local port nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", ["offline", "no token", "no network", "read-only token"])
def test_push_to_hub_is_checked_before_anything_is_loaded(
    case: str, hub: ThreadingHTTPServer, tiny_model: str, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    env = {
        "offline": {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"},
        "no token": {"HF_ENDPOINT": endpoint},
        "no network": {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": "hf_test"},
        "read-only token": {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test"},
    }[case]
    hub.whoami["auth"]["accessToken"]["role"] = "read"
    expected = {
        "offline": "The Hub is switched off on this machine (HF_HUB_OFFLINE=1): unset it to push, or leave the push",
        "no token": "No Hugging Face token on this machine, and pushing needs one with write access: log in with",
        "no network": "Cannot push to the Hub: http://127.0.0.1:",
        "read-only token": "The Hub token of 'user' may not write to user/tiny-stage1: use a token with write access",
    }[case]
    argv = ["train", "--model", tiny_model, "--block", "stage1", "--train-n", "20", "--eval-n", "10", "--epochs", "1"]
    argv += ["--output-dir", str(tmp_path / "run"), "--push-to-hub", "--hub-model-id", "tiny-stage1"]
    result = run_cli(argv, tmp_path, **env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"surgical-peft train: error: {expected}") and result.stderr.count("\n") == 1
    assert "Data:" not in result.stdout and not (tmp_path / "run").exists()  # nothing loaded, nothing written
    if case == "no network":
        assert "(ConnectError: " in result.stderr


def test_a_failed_push_says_where_the_adapter_is_and_push_uploads_it_later(
    hub: ThreadingHTTPServer, tiny_model: str, tmp_path: Path
) -> None:
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_TOKEN": "hf_test"}
    hub.refuse_commits = True  # the Hub answers, then fails the upload (after training)
    run, repo = tmp_path / "run", "user/tiny-stage1"
    argv = ["train", "--model", tiny_model, "--block", "stage1", "--train-n", "20", "--eval-n", "10", "--epochs", "1"]
    argv += ["--output-dir", str(run), "--no-progress", "--push-to-hub", "--hub-model-id", repo]
    result = run_cli(argv, tmp_path, **env)
    assert result.returncode == 2, result.stderr[-3000:]
    adapter = run / "adapter"
    line = result.stderr.splitlines()[-1]  # (after the card's warning that the base is a local path)
    assert line.startswith(f"surgical-peft train: error: pushing to the Hub repository {repo} failed (")
    assert line.endswith(f"The adapter is saved in {adapter}; push it later with: surgical-peft push {adapter} {repo}")
    assert (adapter / "adapter_model.safetensors").is_file() and (run / "metrics.json").is_file()

    hub.refuse_commits = False
    result = run_cli(["push", str(adapter), repo], tmp_path, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    url = f"http://127.0.0.1:{hub.server_address[1]}/{repo}/commit/{COMMIT}"
    assert result.stdout.splitlines() == [f"Pushed {adapter} to the Hub: {url}"]
    (commit,) = hub.commits[repo]
    assert commit == {path.name: path.read_bytes() for path in adapter.iterdir()}  # as saved, card included
    assert f'PeftModel.from_pretrained(base, "{repo}")' in commit["README.md"].decode()  # rendered for the repository


def test_push_refuses_a_directory_without_an_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tmp_path), "me/adapter"]) == 2  # refused before the Hub is asked
    assert f"{tmp_path} holds no adapter (adapter_config.json is missing)" in capsys.readouterr().err


def test_save_pretrained_and_trainer_save_model_write_this_librarys_card(tmp_path: Path) -> None:
    base = build_model("resnet-basic")
    base.save_pretrained(tmp_path / "base")  # a local base: PEFT's save looks it up there, not on the Hub
    base.name_or_path = str(tmp_path / "base")
    model = get_peft_model(base, SurgicalConfig(block="stage1"))
    model.save_pretrained(tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "import surgical_peft  # registers the SURGICAL PEFT type with PEFT" in card
    assert "[More Information Needed]" not in card and "block:stage1" in front_matter(card.encode())["tags"]
    assert f'AutoModelForImageClassification.from_pretrained("{BASE_MODEL_PLACEHOLDER}")' in card

    arguments = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=arguments).save_model(str(tmp_path / "trainer"))
    assert (tmp_path / "trainer" / "README.md").read_text() == card

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("# My notes\n")  # a card already there is PEFT's to update
    model.save_pretrained(tmp_path / "mine")
    assert "# My notes" in (tmp_path / "mine" / "README.md").read_text()
    lora = peft.get_peft_model(build_model("resnet-basic"), peft.LoraConfig(target_modules=["classifier.1"]))
    lora.save_pretrained(tmp_path / "lora")  # another method's card is PEFT's own
    assert "import surgical_peft" not in (tmp_path / "lora" / "README.md").read_text()


def test_save_pretrained_writes_its_card_after_the_weights(tmp_path: Path) -> None:
    """PEFT writes its card before the weights: a second save rewrote this library's card as PEFT's own (its tags
    gone), and a save refused for a NaN left a new card beside the old adapter."""
    model = get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage1"))
    model.save_pretrained(tmp_path)
    saved = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    model.save_pretrained(tmp_path)  # again: the same card, still this library's
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == saved
    assert "surgical-fine-tuning" in front_matter(saved["README.md"])["tags"]

    other = get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage2"))
    tuned = next(parameter for parameter in other.parameters() if parameter.requires_grad)
    with torch.no_grad():
        tuned.fill_(float("nan"))
    with pytest.raises(InputError, match="was not saved"):
        other.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == saved  # card and adapter as they were


def test_save_pretrained_into_a_read_only_directory_fails_as_peft_does() -> None:
    """PEFT's first write is its card, whose PermissionError names the directory; with the card written after the
    weights, the first write was safetensors', whose error was a raw SafetensorError."""
    model = get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage1"))
    reachable = Path(tempfile.mkdtemp())  # (pytest's tmp_path sits in a directory only its owner may enter)
    reachable.chmod(0o755)
    directory = reachable / "read-only"
    directory.mkdir(mode=0o555)
    as_root = os.geteuid() == 0  # root writes anywhere: save as an unprivileged user
    if as_root:
        os.setegid(65534)
        os.seteuid(65534)
    try:
        with pytest.raises(PermissionError, match=str(directory)):
            model.save_pretrained(directory)
    finally:
        if as_root:
            os.seteuid(0)
            os.setegid(0)
    assert list(directory.iterdir()) == []
    directory.rmdir()
    reachable.rmdir()
