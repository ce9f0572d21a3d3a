"""Model sources beyond torchvision and timm: ``hf:<repo>`` (Hugging Face Transformers) and
``openclip:`` (OpenCLIP image towers), loaded by name from a Hugging Face cache the tests write
with the libraries' own APIs, with the network off.

huggingface_hub and transformers read ``HF_HOME`` when first imported, so everything that loads
from the temporary cache runs in a child process with ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` set
(as a user's shell would); each child prints one JSON line that the test reads."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import IMAGENET_CHECK, needs_shared
from .hub_models import (
    OPENCLIP_TIMM_TOWERS,
    write_hf_models,
    write_openclip_folder,
    write_openclip_model,
    write_vitmae,
)

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    """A Hugging Face cache with four tiny transformers models and a tiny OpenCLIP model, and a
    data folder of eight shared photos (symbolic links, two classes)."""
    tmp = tmp_path_factory.mktemp("hub")
    home = tmp / "hf"
    repos = write_hf_models(home)
    repos["openclip"] = write_openclip_model(home)
    repos["vitmae"] = write_vitmae(home)
    for name, vision in OPENCLIP_TIMM_TOWERS.items():
        repos[name] = str(write_openclip_folder(tmp / name, vision))
    data = tmp / "data"
    photos = sorted(IMAGENET_CHECK.glob("*.JPEG"))[:8] if IMAGENET_CHECK.is_dir() else []
    for i, f in enumerate(photos):
        (data / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (data / "ab"[i % 2] / f.name).symlink_to(f)
    return {"home": home, "repos": repos, "data": data, "tmp": tmp}


def child(code: str, home: Path, offline: bool = True, **env_extra) -> dict:
    """Run ``code`` in a fresh interpreter with ``HF_HOME=home``; its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CNNCODES_OFFLINE")}
    env.update(HF_HOME=str(home), PYTHONPATH=str(ROOT), **env_extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(args: list[str], home: Path, offline: bool = True, block: str | None = None, cwd: Path = ROOT,
        **env_extra):
    """``cnncodes ARGS`` in a fresh interpreter (``block``: a library made unimportable), run in
    ``cwd`` (where default cache/ and reports/ folders go)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CNNCODES_OFFLINE")}
    env.update(HF_HOME=str(home), **env_extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    pre = f"import sys; sys.modules[{block!r}] = None; " if block else "import sys; "
    code = pre + "from cnncodes.pipelines.cli import main; sys.argv = ['cnncodes'] + sys.argv[1:]; main()"
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)


def cli_runs(runs: list[list[str]], home: Path, block: str | None = None, **env_extra) -> list[dict]:
    """Several ``cnncodes`` command lines in one fresh interpreter (click's test runner there),
    each as ``{"code": exit code, "out": stdout, "err": stderr}``."""
    pre = f"import sys; sys.modules[{block!r}] = None\n" if block else ""
    code = pre + (
        "import json\nfrom click.testing import CliRunner\nfrom cnncodes.pipelines.cli import cli\n"
        f"runs = {runs!r}\nres = [CliRunner().invoke(cli, r) for r in runs]\n"
        "print(json.dumps([{'code': r.exit_code, 'out': r.stdout, 'err': r.stderr} for r in res]))")
    return child(code, home, **env_extra)


# What the child compares: cnncodes' codes from `extract` against each library's own
# preprocessing and forward pass on the same photos.
_EXTRACT_AND_COMPARE = r"""
import json, sys
import torch
from click.testing import CliRunner
from PIL import Image
from cnncodes.pipelines.cli import cli
from cnncodes.extractor import open_cache

data, tmp, repos = ARGS
report = {}

def codes(model, layers, pool):
    out = f"{tmp}/{model.replace(':', '_').replace('/', '_')}-{pool}.h5"
    r = CliRunner().invoke(cli, ["extract", data, "-m", model, *[a for l in layers for a in ("-l", l)],
                                 "--pool", pool, "--out", out, "-q"])
    assert r.exit_code == 0, r.output
    with open_cache(out) as c:
        return c.paths, {l: torch.from_numpy(c.codes(l)) for l in layers}, c.layer_attrs(layers[0])

def images(paths):
    return [Image.open(f"{data}/{p}").convert("RGB") for p in paths]

def diff(a, b):
    return float((a - b.float()).abs().max())

import transformers as tr
for name in ("vit", "dinov2", "clip", "swin"):
    repo = repos[name]
    layers = ["block:-1", "penultimate"] + (["projection"] if name == "clip" else [])
    pool = "mean" if name == "swin" else "cls"
    paths, got, attrs = codes(f"hf:{repo}", layers, pool)
    proc = tr.AutoImageProcessor.from_pretrained(repo)
    model = tr.AutoModel.from_pretrained(repo).eval()
    x = proc(images=images(paths), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tower = model.vision_model if name == "clip" else model
        out = tower(pixel_values=x, output_hidden_states=True)
        last = out.hidden_states[-1]
        ref = {"block:-1": last.mean(1) if pool == "mean" else last[:, 0]}
        ref["penultimate"] = out.last_hidden_state[:, 0] if name == "vit" else out.pooler_output
        if name == "clip":
            feats = model.get_image_features(pixel_values=x)
            ref["projection"] = getattr(feats, "pooler_output", feats)
    report[name] = {l: diff(got[l], ref[l]) for l in layers}
    report[name]["prefix"] = attrs.get("prefix_tokens")
    report[name]["scale"] = float(ref["block:-1"].abs().max())

import open_clip
repo = repos["openclip"]
paths, got, attrs = codes(f"openclip:hf-hub:{repo}", ["block:-1", "penultimate", "projection"], "cls")
model, _, pre = open_clip.create_model_and_transforms(f"hf-hub:{repo}")
model.eval()
x = torch.stack([pre(im) for im in images(paths)])
seen = {}
h = model.visual.transformer.resblocks[-1].register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
with torch.no_grad():
    proj = model.encode_image(x)
h.remove()
emb = proj @ torch.linalg.pinv(model.visual.proj)  # the pre-projection embedding, recovered
for tower in ("timm-token", "timm-linear"):  # towers of timm trunks: projection = encode_image
    folder = repos[tower]
    paths, tgot, tattrs = codes(f"openclip:local-dir:{folder}", ["projection", "penultimate"], "avg")
    tmodel, _, tpre = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tx = torch.stack([tpre(im) for im in images(paths)])
    with torch.no_grad():
        tref = tmodel.eval().encode_image(tx)
    report[tower] = {"projection": diff(tgot["projection"], tref), "dim": int(tgot["penultimate"].shape[1])}
report["openclip"] = {"block:-1": diff(got["block:-1"], seen["t"][:, 0]),
                      "projection": diff(got["projection"], proj),
                      "reprojected": diff(got["penultimate"] @ model.visual.proj, proj),
                      "prefix": attrs.get("prefix_tokens")}
print(json.dumps(report))
"""


@needs_shared
def test_codes_equal_each_librarys_own_preprocessing_and_forward_offline(hub):
    args = (str(hub["data"]), str(hub["tmp"]), hub["repos"])
    got = child(f"ARGS = {args!r}\n" + _EXTRACT_AND_COMPARE, hub["home"])
    # a sanity floor: the codes are not all zero, so 1e-5 is a real tolerance
    assert all(got[m]["scale"] > 0.1 for m in ("vit", "dinov2", "clip", "swin"))
    for model, layers in got.items():
        for layer, d in layers.items():
            if layer not in ("prefix", "scale", "dim"):
                assert d <= 1e-5, (model, layer, d)
    assert got["vit"]["prefix"] == 1 and got["dinov2"]["prefix"] == 5 and got["clip"]["prefix"] == 1
    assert got["openclip"]["prefix"] == 1
    # the embedding before the projection: the ViT trunk's 192 features, the ResNet's 512
    assert got["timm-token"]["dim"] == 192 and got["timm-linear"]["dim"] == 512


_DESCRIBE = r"""
import json
from cnncodes.extractor import load_backbone, list_layers
out = {}
for name in NAMES:
    bb = load_backbone(name, "DEFAULT")
    layers, aliases = list_layers(name, "DEFAULT")
    out[name] = {"weights": bb.weights, "pre": bb.preprocessing, "decode": bb.decode,
                 "split": bb.split is not None,
                 "aliases": {k: v.name for k, v in aliases.items()},
                 "kinds": {l.name: l.kind for l in layers}}
print(json.dumps(out, default=str))
"""


def test_weights_preprocessing_and_aliases_are_recorded_from_the_repositories(hub):
    r = hub["repos"]
    names = [f"hf:{r['vit']}", f"hf:{r['clip']}@{'0123456789abcdef0123456789abcdef01234567'}",
             f"hf:{r['swin']}", f"openclip:hf-hub:{r['openclip']}"]
    got = child(_DESCRIBE.replace("NAMES", repr(names)), hub["home"])
    vit, clip, swin, oc = (got[n] for n in names)
    assert vit["weights"]["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert vit["weights"]["name"] == f"hf:{r['vit']}@0123456789abcdef0123456789abcdef01234567"
    assert len(vit["weights"]["sha256"]) == 64 and vit["weights"]["files"] == ["model.safetensors"]
    assert vit["pre"]["processor"] == "ViTImageProcessor" and vit["pre"]["crop"] == 32
    assert vit["pre"]["size"] == {"height": 32, "width": 32} and vit["pre"]["interpolation"] == "bilinear"
    assert vit["decode"] == "exact" and vit["split"]  # the processor cut in two, bitwise
    # ViT: quarters of its 3 blocks; penultimate is the CLS token after the final norm (the head)
    assert vit["aliases"]["stage4"] == "model.layers.2" and vit["aliases"]["penultimate"] == "head"
    assert vit["kinds"]["model.layers.2"] == "tokens"
    # CLIP: the vision tower, its projection an alias, penultimate its input
    assert clip["aliases"]["projection"] == "projection" and clip["aliases"]["penultimate"] == "head"
    assert clip["pre"]["interpolation"] == "bicubic"
    assert clip["pre"]["crop_size"] == {"height": 32, "width": 32}
    # Swin written with tokens: quarters of its blocks, as other token models; its (C, 1) pool is internal
    assert swin["aliases"]["stage1"] == "model.encoder.layers.0.blocks.0"
    assert swin["aliases"]["stage4"] == "model.encoder.layers.2.blocks.1"
    assert swin["kinds"]["model.pooler"] == "internal"
    # OpenCLIP: the projection is a layer; the tower's transformer blocks are token blocks
    assert oc["aliases"]["projection"] == "projection" and oc["aliases"]["penultimate"] == "head"
    assert oc["aliases"]["stage4"] == "visual.transformer.resblocks.1"
    assert oc["pre"]["mean"] == [0.4, 0.45, 0.5] and oc["pre"]["interpolation"] == "bicubic"
    assert oc["split"] and oc["decode"] == "exact"


def test_list_models_and_list_layers_show_both_sources(hub):
    r = hub["repos"]
    hf, oc, layers = cli_runs([["list-models", "--family", "hf", "--json"],
                               ["list-models", "--family", "openclip", "--json"],
                               ["list-layers", "--model", f"hf:{r['clip']}"]], hub["home"])
    assert hf["code"] == oc["code"] == layers["code"] == 0, (hf, oc, layers)
    rows = json.loads(hf["out"])
    assert {f"hf:{r[k]}" for k in ("vit", "dinov2", "clip", "swin")} <= {x["name"] for x in rows}
    assert all(x["offline"] and x["family"] == "hf" for x in rows)
    tags = {x["name"]: x for x in json.loads(oc["out"])}
    assert "openclip:ViT-B-32/openai" in tags and not tags["openclip:ViT-B-32/openai"]["offline"]
    assert tags["openclip:ViT-B-32/openai"]["default_weights"].startswith("hf-hub:")
    assert "projection" in layers["out"] and "1+16 tokens x 32" in layers["out"]


def test_a_sweep_across_timm_hf_and_openclip_writes_one_report(hub):
    r = hub["repos"]
    report = hub["tmp"] / "sweep-report"
    out = cli(["sweep", str(hub["data"]), "-m", "timm:test_vit", "-w", "none", "-w", "DEFAULT",
               "-w", "DEFAULT", "-m", f"hf:{r['vit']}", "-m", f"openclip:hf-hub:{r['openclip']}",
               "--layers", "stage2,penultimate", "--classifier", "softmax", "--folds", "2",
               "--holdout", "0.25", "--report", str(report), "--json"],
              hub["home"], cwd=hub["tmp"])  # its caches go to cache/ there
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((report / "sweep.json").read_text())
    models = {row["model"] for row in summary["rows"]}
    assert models == {"timm:test_vit", f"hf:{r['vit']}", f"openclip:hf-hub:{r['openclip']}"}
    assert (report / "index.html").is_file() and (report / "sweep.png").is_file()


def test_a_missing_extra_an_unknown_name_and_offline_without_files_are_one_line_each(hub, tmp_path):
    data = tmp_path / "d" / "a"
    data.mkdir(parents=True)
    (data / "x.png").write_bytes(b"")
    args = ["extract", str(tmp_path / "d"), "--out", str(tmp_path / "c.h5"), "-q", "--model"]
    cases = {  # library made unimportable: the command lines, and what the one line says
        "transformers": [(["hf:cnncodes-test/tiny-vit"], "pip install 'cnncodes[hf]'")],
        "open_clip": [(["openclip:ViT-B-32/openai"], "pip install 'cnncodes[openclip]'")],
        None: [(["hf:cnncodes-test/no-such-model"], "is not in the Hugging Face cache"),
               (["openclip:ViT-B-32/openai", "--offline"], "the network is off"),
               (["openclip:ViT-B-32/no-such-tag"], "is not a pretrained tag of OpenCLIP's ViT-B-32"),
               (["openclip:ViT-B-99/openai"], "is not an OpenCLIP architecture"),
               (["openclip:ViT-B-32"], "names no pretrained tag"),
               (["hf:cnncodes-test/tiny-vit", "--weights", "x.pt"], "hf:/path/to/folder"),
               (["hf:cnncodes-test/tiny-vitmae"], "gives another output each time"),
               (["hf:cnncodes-test/tiny-openclip"], "an OpenCLIP repository? use openclip:hf-hub:"),
               (["openclip:hf-hub:cnncodes-test/tiny-vit"], "a transformers model? use hf:"),
               (["openclip:hf-hub:cnncodes-test/tiny-openclip@v2"], "take no @revision"),
               ([f"openclip:local-dir:{tmp_path / 'none'}"], "is not a folder with an open_clip_config.json"),
               ([f"hf:{tmp_path / 'nothing'}"], "there is no folder"),
               ([f"hf:{data / 'x.png'}"], "is not a folder written by save_pretrained"),
               (["openclip:ViT-B-32", "--weights", str(data / "x.png")], "could not load openclip:ViT-B-32")],
    }
    for block, runs in cases.items():
        results = cli_runs([args + extra for extra, _ in runs], hub["home"], block=block)
        for (extra, message), res in zip(runs, results):
            err = res["err"].strip()
            assert res["code"] == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, (extra, res)
            assert message in err, (extra, err)


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A hub that knows no repository (what huggingface.co answers for one that does not exist)."""

    def _answer(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepositoryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *a):
        pass


def test_an_unknown_repository_online_is_one_line(hub, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        out = cli(["list-layers", "--model", "hf:cnncodes-test/no-such-model"], tmp_path / "empty",
                  offline=False,
                  HF_ENDPOINT=f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = out.stderr.strip()
    assert out.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not load" in err and "hf:cnncodes-test/no-such-model" in err


def test_a_local_folder_loads_by_its_path_and_random_weights_are_seeded(hub, tmp_path):
    r = hub["repos"]
    folder = next((hub["home"] / "hub").glob("models--cnncodes-test--tiny-vit/snapshots/*"))
    got = child("import json; from cnncodes.extractor import load_backbone; "
                f"f = load_backbone('hf:{folder}', 'DEFAULT'); "
                f"a = load_backbone('hf:{r['vit']}', 'none', seed=3); "
                f"b = load_backbone('hf:{r['vit']}', 'none', seed=3); "
                "sa, sb = a.model.state_dict(), b.model.state_dict(); "
                "print(json.dumps({'name': f.weights['name'], 'crop': f.input_size, "
                "'same': all(bool((sa[k] == sb[k]).all()) for k in sa), 'w': a.weights['name'], "
                "'seed': a.weights.get('seed')}))", hub["home"])
    assert got == {"name": f"hf:{folder.resolve()}", "crop": 32, "same": True, "w": "none", "seed": 3}


def test_openvino_runs_both_sources_with_the_processors_normalisation_in_its_graph(hub):
    """The compiled graph takes the decoders' uint8 batch and normalises it itself: with
    transformers' 1/255 folded into mean and std (a ViT), and OpenCLIP's attention, whose fused
    inference operator has no ONNX export, traced on its ordinary path. ``--runtime openvino``
    refuses codes more than 1e-5 (of the layer's scale) from PyTorch's."""
    pytest.importorskip("openvino")
    r = hub["repos"]
    tmp = hub["tmp"]
    runs = [["extract", str(hub["data"]), "-m", model, "-l", layer, "--pool", "cls", "--runtime", "openvino",
             "--out", str(tmp / f"ov-{i}.h5"), "--json"]
            for i, (model, layer) in enumerate([(f"hf:{r['vit']}", "block:-1"),
                                                (f"openclip:hf-hub:{r['openclip']}", "projection")])]
    for res in cli_runs(runs, hub["home"]):
        assert res["code"] == 0, res
        assert json.loads(res["out"])["runtime"].startswith("openvino"), res["out"]


_TAGGED = r"""
import json, pathlib
import torch
import open_clip
import open_clip.pretrained as registry
from click.testing import CliRunner
from PIL import Image
from cnncodes.extractor import load_backbone, open_cache
from cnncodes.pipelines.cli import cli
from tests.hub_models import OPENCLIP_CONFIG

data, tmp, repo = ARGS
# An architecture and a pretrained tag registered as OpenCLIP registers its own (a config file
# on its config path; the tag's entry in its table of pretrained weights), whose weights are the
# tiny hub repository's and whose preprocessing differs from the architecture's defaults.
folder = pathlib.Path(tmp) / "openclip-configs"
folder.mkdir(exist_ok=True)
(folder / "cnncodes-tiny.json").write_text(json.dumps(OPENCLIP_CONFIG["model_cfg"]))
open_clip.add_model_config(folder)
registry._PRETRAINED["cnncodes-tiny"] = {"t": registry._pcfg(
    hf_hub=f"{repo}/", mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), interpolation="bilinear", quick_gelu=True)}
bb = load_backbone("openclip:cnncodes-tiny/t", "DEFAULT")
out = f"{tmp}/tagged.h5"
r = CliRunner().invoke(cli, ["extract", data, "-m", "openclip:cnncodes-tiny/t", "-l", "projection",
                             "--out", out, "-q"])
assert r.exit_code == 0, r.output
with open_cache(out) as c:
    paths, got = c.paths, torch.from_numpy(c.codes("projection"))
# the library's own model with the activation the tag was trained with (OpenCLIP only warns)
model, _, pre = open_clip.create_model_and_transforms("cnncodes-tiny", pretrained="t", force_quick_gelu=True)
acts = sorted({type(m).__name__ for m in bb.model.modules() if "GELU" in type(m).__name__})
x = torch.stack([pre(Image.open(f"{data}/{p}").convert("RGB")) for p in paths])
with torch.no_grad():
    ref = model.eval().encode_image(x)
none = load_backbone("openclip:cnncodes-tiny/t", "none")  # random weights, the tag's preprocessing still
print(json.dumps({"pre": bb.preprocessing, "weights": bb.weights, "diff": float((got - ref).abs().max()),
                  "acts": acts, "none_mean": none.preprocessing["mean"]}))
"""


@needs_shared
def test_an_architecture_and_tag_from_the_cache_keep_the_tags_preprocessing(hub):
    """open_clip #1068: OpenCLIP given a weights file instead of a tag uses the architecture's
    default preprocessing; cnncodes hands it the cached file with the tag's preprocessing named."""
    args = (str(hub["data"]), str(hub["tmp"]), hub["repos"]["openclip"])
    got = child(f"ARGS = {args!r}\n" + _TAGGED, hub["home"])
    assert got["pre"]["mean"] == [0.1, 0.2, 0.3] and got["pre"]["interpolation"] == "bilinear"
    assert got["weights"]["tag"] == "t" and got["weights"]["file"].endswith("open_clip_model.safetensors")
    assert got["diff"] <= 1e-5
    assert got["acts"] == ["QuickGELU"]  # what the tag was trained with, which OpenCLIP only warns about
    assert got["none_mean"] == [0.1, 0.2, 0.3]
