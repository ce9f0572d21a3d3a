"""torchvision weights by name: downloaded on first use from a real HTTP server on 127.0.0.1,
reused after, refused when the hash in their name does not match, never fetched offline."""
from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cnncodes.extractor.errors import WeightsNotFoundError

from cnncodes.pipelines.cli import cli

from cnncodes import extractor


class _Server:
    """A loopback HTTP server over one folder that counts requests and can cut files short."""

    def __init__(self, root: Path):
        server = self
        self.requests: list[str] = []
        self.cut_after: int | None = None  # bytes sent before the connection is dropped

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                if server.cut_after is None:
                    return super().do_GET()
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:server.cut_after])
                self.wfile.flush()
                self.connection.close()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, r18_weights, monkeypatch):
    """resnet18's DEFAULT weights entry pointed at a loopback server holding a real state dict,
    named with its own hash prefix as torchvision's files are; the network allowed."""
    import torchvision
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CNNCODES_OFFLINE", raising=False)
    root = tmp_path / "www"
    root.mkdir()
    data = r18_weights.read_bytes()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (root / name).write_bytes(data)
    (root / "resnet18-00000000.pth").write_bytes(data)  # a name whose hash prefix is wrong
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value
    with _Server(root) as server:
        monkeypatch.setattr(entry, "url", f"{server.url}/{name}")
        yield server, entry, name


def test_first_use_downloads_with_progress_and_the_second_reuses(served, capfd):
    server, _, name = served
    bb = extractor.load_backbone("resnet18", "DEFAULT")
    assert server.requests == [f"/{name}"]
    assert "%" in capfd.readouterr().err  # torch.hub's progress bar on stderr
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    assert cached.is_file() and bb.weights["file"] == name
    assert bb.weights["argument"].endswith("IMAGENET1K_V1")
    assert not list(cached.parent.glob("*.partial"))
    again = extractor.load_backbone("resnet18", "DEFAULT")
    assert server.requests == [f"/{name}"] and again.weights["sha256"] == bb.weights["sha256"]


def test_a_file_whose_hash_does_not_match_is_refused_and_not_kept(served, monkeypatch):
    server, entry, _ = served
    monkeypatch.setattr(entry, "url", f"{server.url}/resnet18-00000000.pth")
    with pytest.raises(WeightsNotFoundError, match="does not match the hash in its name, so it was not kept"):
        extractor.load_backbone("resnet18", "DEFAULT")
    assert not list((Path(torch.hub.get_dir()) / "checkpoints").glob("*"))


def test_a_connection_cut_mid_file_leaves_nothing_behind(served):
    server, _, name = served
    server.cut_after = 100_000
    result = CliRunner().invoke(cli, ["list-layers", "--model", "resnet18"])  # builds without weights
    assert result.exit_code == 0
    # torch.hub reads to the end of what came: the cut file fails its hash check, and is not kept
    words = f"{name} does not match the hash.*not kept.*put {name} in"
    with pytest.raises(WeightsNotFoundError, match=words):
        extractor.load_backbone("resnet18", "DEFAULT")
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    assert not folder.exists() or not list(folder.iterdir())


def test_offline_never_connects_and_says_where_the_file_goes(served, image_folder, tmp_path):
    server, _, name = served
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(tmp_path / "c.h5"),
                                      "--model", "resnet18", "--offline"])
    assert result.exit_code == 1 and server.requests == []
    assert "the network is off" in result.output and f"put {name} in" in result.output
    assert result.output.count("\n") == 1


def test_an_unreachable_server_is_one_line(served, monkeypatch, image_folder, tmp_path):
    import socket
    _, entry, name = served
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(entry, "url", f"http://127.0.0.1:{port}/{name}")
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--out", str(tmp_path / "c.h5"),
                                      "--model", "resnet18", "-q"])
    # torch.hub's own "Downloading: ..." notice, then one line of error; no traceback
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if not line.startswith("Downloading: ")]
    assert result.exit_code == 1 and len(lines) == 2 and len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith("Error: could not download") and "rerun when online" in errors[0]


# --- timm by name, from a Hugging Face cache the test writes ----------------------------------

def _hf_cache(home: Path, repo: str, state: dict) -> Path:
    """The layout huggingface_hub keeps under ``HF_HOME``: refs/main names a snapshot that holds
    the file (a blob and its link, as the hub writes them)."""
    from safetensors.torch import save_file
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    blob = folder / "blobs" / "model"
    blob.parent.mkdir()
    save_file(state, str(blob))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    return blob


def test_timm_by_name_with_its_tag_from_the_hugging_face_cache(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet.r160_in1k", pretrained=False)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    blob = _hf_cache(tmp_path / "hf", "timm/test_efficientnet.r160_in1k", state)
    code = """
import json, sys
from cnncodes import extractor
from timm.data import resolve_data_config
bb = extractor.load_backbone("timm:test_efficientnet.r160_in1k", "DEFAULT")
cfg = resolve_data_config({}, model=bb.model)
w = bb.model.state_dict()["conv_stem.weight"]
cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
print(json.dumps({"weights": bb.weights, "pre": bb.preprocessing, "cfg": cfg, "stem": float(w.sum())}))
"""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["weights"]["tag"] == "r160_in1k"
    assert got["weights"]["name"] == "timm:test_efficientnet.r160_in1k"
    assert got["weights"]["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert abs(got["stem"] - float(state["conv_stem.weight"].sum())) < 1e-5  # these very weights
    cfg = got["cfg"]
    assert got["pre"]["crop"] == cfg["input_size"][-1] == 160 and got["pre"]["crop_pct"] == cfg["crop_pct"]
    assert got["pre"]["interpolation"] == cfg["interpolation"] and got["pre"]["mean"] == cfg["mean"]
    # missing from the cache while offline: one line that says so, at once
    env["HF_HOME"] = str(tmp_path / "empty")
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    (data / "x.png").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "cnncodes", "extract", str(tmp_path / "data"), "--out",
                          str(tmp_path / "c.h5"), "--model", "timm:test_efficientnet.r160_in1k", "-q"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "not in the Hugging Face cache" in out.stderr and "network is off" in out.stderr


def test_list_models_by_family_pattern_and_pretrained_tags(tmp_path):
    import json
    run = CliRunner().invoke
    rows = json.loads(run(cli, ["list-models", "--json"]).output)
    assert {r["family"] for r in rows} == {"embedded", "torchvision"}
    embedded = [r["name"] for r in rows if r["family"] == "embedded"]
    assert embedded == [f"efficientnet_lite{k}" for k in range(3)]
    assert all(r["offline"] for r in rows if r["family"] == "embedded")
    tags = json.loads(run(cli, ["list-models", "--family", "timm", "--pretrained", "resnet18.*",
                                "--json"]).output)
    assert "timm:resnet18.a1_in1k" in {r["name"] for r in tags} and all(r["family"] == "timm" for r in tags)
    assert all(r["default_weights"].startswith("hf-hub:timm/resnet18.") for r in tags)
    text = run(cli, ["list-models", "resnet1*", "--where"]).output
    assert "resnet18 " in text and "timm:resnet18" in text and "hub" in text
    result = run(cli, ["list-models", "nothing-like-this*"])
    assert result.exit_code == 1 and "no model matches" in result.output


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CNNCODES_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    code = ("from cnncodes import extractor; "
            "extractor.load_backbone('timm:test_efficientnet.r160_in1k', 'DEFAULT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    # one connection tried first, instead of huggingface_hub's minute of retries
    assert out.returncode == 1 and "could not reach 127.0.0.1 to download timm/test_efficientnet.r160_in1k" \
        in out.stderr
