"""Pretrained towers resolved and loaded exactly as open_clip does, proven on fake caches with random
weights in the real architecture; local files, folders and hf-hub names; offline and proxies."""
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embed.models import ALIASES, describe_models
from embed.pretrained import resolve_tag

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_is_what_open_clip_resolves_for_its_tag(alias):
    r = ALIASES[alias]
    assert resolve_tag(r.arch, r.tag, alias) == r  # QuickGELU, mean, std, interpolation, resize mode, repo
    assert r.describe() in describe_models()


@pytest.mark.slow
def test_vit_b_32_openai_and_every_local_form_embed_as_open_clip_does(tmp_path):
    """One alias end to end on a fake Hugging Face cache (offline): the same embeddings as open_clip's
    create_model_and_transforms('ViT-B-32-quickgelu', 'openai'); then the same weights as a file, an
    open_clip folder and an hf-hub repo. The weights make GELU and QuickGELU differ (cosine ~0.994), so
    a tower built with the wrong activation fails."""
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_hub.py"), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["gelu_vs_quickgelu"] < 0.999  # the difference is visible
    for form in ("alias", "file", "folder", "hf_hub"):
        assert res[form]["activation"] == "QuickGELU", form
        assert res[form]["cosine"] >= 0.9999, (form, res[form]["cosine"])
    assert res["alias"]["name"] == "vit-b-32-openai" and res["alias"]["image_size"] == 224
    assert res["alias"]["interpolation"] == "bicubic"
    # a file's and a folder's names carry the weights' hash: same weights, same hash
    assert res["file"]["name"].split("@")[1] == res["folder"]["name"].split("@")[1]


def _offline_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy",
                                                            "HTTP_PROXY", "http_proxy")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", **extra}


def test_missing_weights_fail_fast_and_say_how_to_get_them(tmp_path):
    code = ("import time, sys\nfrom embed.models import load_backbone, BackboneError\nt = time.time()\n"
            "try:\n    load_backbone('vit-b-32-openai')\nexcept BackboneError as e:\n"
            "    print(round(time.time() - t, 2), e)\n    sys.exit(0)\nsys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_offline_env(tmp_path), capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    seconds, message = r.stdout.split(" ", 1)
    assert float(seconds) < 5
    assert "vit-b-32-openai (open_clip ViT-B-32:openai, hub repo timm/vit_base_patch32_clip_224.openai" in message
    assert "open_clip_model.safetensors" in message
    assert str(tmp_path / "hf" / "hub") in message  # the cache folder it looked in
    assert "hf download timm/vit_base_patch32_clip_224.openai" in message
    assert "--model ViT-B-32-quickgelu:/path/to/" in message
    assert "OSV-5M" not in message and "--no-download" not in message  # the dataset's advice is elsewhere


def test_the_hub_is_reached_through_the_proxy_the_environment_names(tmp_path):
    """An endpoint that resolves nowhere, reached through a (fake, local) HTTP proxy: online. Without
    the proxy: offline, within seconds."""
    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = "from geovote.hub import check_online\ncheck_online()\nprint('online')\n"
    env = _offline_env(tmp_path, HF_ENDPOINT="http://hub.invalid")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env={**env, "http_proxy": f"http://127.0.0.1:{server.server_port}"})
        assert r.returncode == 0 and r.stdout.strip() == "online", r.stderr
        assert seen and seen[0].startswith("http://hub.invalid/")  # the request went through the proxy
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=env)
        assert r.returncode != 0 and "cannot reach the Hugging Face hub at http://hub.invalid" in r.stderr
        assert time.time() - t0 < 10
    finally:
        server.shutdown()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and "HF_HUB_OFFLINE is set" in r.stderr


def test_model_list_and_a_bare_weights_file(tmp_path, capsys):
    from embed.build import main as embed_main
    from embed.models import BackboneError, load_backbone

    assert embed_main(["--model", "list"]) == 0
    out = capsys.readouterr().out
    assert "vit-b-32-openai      open_clip ViT-B-32, tag openai" in out and "QuickGELU" in out
    f = tmp_path / "w.bin"
    f.write_bytes(b"0")
    with pytest.raises(BackboneError, match="name its open_clip architecture too"):
        load_backbone(str(f))
    with pytest.raises(BackboneError, match="no weights file"):
        load_backbone(f"ViT-B-32:{tmp_path / 'missing.bin'}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BackboneError, match="expected an open_clip weights file"):
        load_backbone(f"ViT-B-32:{tmp_path / 'notes.txt'}")


@pytest.mark.parametrize("arch", [
    {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}},
    {"embed_dim": 128, "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 192, "layers": 6, "head_width": 64}},
    {"embed_dim": 24, "vision_cfg": {"image_size": 48, "patch_size": 12, "width": 64, "layers": 2, "head_width": 32,
                                     "mlp_ratio": 2.0}},
])
def test_our_vit_is_open_clips_tower(arch):
    """embed.vit takes open_clip's state dict unchanged and gives its outputs (random weights, with the
    MLPs and attention scaled up so that every part weighs in)."""
    import torch
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from embed import vit

    torch.manual_seed(0)
    theirs = _build_vision_tower(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"])).eval()
    with torch.no_grad():
        for _name, p in theirs.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = vit.VisionTransformer(arch["embed_dim"], arch["vision_cfg"]).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 3, arch["vision_cfg"]["image_size"], arch["vision_cfg"]["image_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    assert vit.supports(arch["vision_cfg"])
    assert not vit.supports({**arch["vision_cfg"], "ls_init_value": 0.1})
    assert not vit.supports({**arch["vision_cfg"], "pool_type": "avg"})


def test_the_bundled_model_loads_without_open_clip():
    code = ("import sys\nfrom embed.models import load_backbone\nfrom embed.features import FeatureExtractor\n"
            "from PIL import Image\nbb = load_backbone('default')\n"
            "e = FeatureExtractor(bb, device='cpu').images([Image.new('RGB', (80, 60), (120, 40, 200))])\n"
            "assert 'open_clip' not in sys.modules and 'torchvision' not in sys.modules, 'imported'\n"
            "print(','.join(f'{v:.6f}' for v in e[0]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    light = [float(v) for v in r.stdout.strip().split(",")]
    # the same tower built by open_clip gives the same embedding
    import numpy as np
    import torch
    from PIL import Image

    from embed.features import FeatureExtractor
    from embed.models import DEFAULT_MODEL_DIR, read_checkpoint_manifest, wrap_tower
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    manifest = read_checkpoint_manifest(DEFAULT_MODEL_DIR)
    tower = _build_vision_tower(manifest["arch"]["embed_dim"], CLIPVisionCfg(**manifest["arch"]["vision_cfg"]))
    state = torch.load(DEFAULT_MODEL_DIR / "visual.pt", weights_only=True)
    tower.load_state_dict({k: v.float() for k, v in state.items()})
    pre = manifest["preprocessing"]
    bb = wrap_tower("oc", tower, pre["mean"], pre["std"], {})
    e = FeatureExtractor(bb, device="cpu").images([Image.new("RGB", (80, 60), (120, 40, 200))])
    np.testing.assert_allclose(light, e[0], atol=2e-5)


def test_a_quickgelu_spec_trains_and_loads_as_the_same_tower():
    """A custom spec with quick_gelu: the tower finetune trains (open_clip's builder) and the one a query
    loads (embed.vit) compute the same function with the same weights."""
    import torch

    from embed.models import build_tower

    arch = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}}
    torch.manual_seed(0)
    trained = build_tower(arch).eval()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loaded = build_tower(arch, weights_follow=True).eval()
    loaded.load_state_dict(trained.state_dict())
    assert type(trained.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-4)
