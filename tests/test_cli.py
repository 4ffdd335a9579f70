"""The command line: a hosted-API JSON request (image served on 127.0.0.1), the JSON line,
--demo in a fresh process, and clear errors for bad input with nothing written outside the
output folder. Tiny random models; WAN_I2V_DEBUG_SIZE keeps the in-process runs tiny."""

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import av
import torch
import pytest

from wan_i2v.wan import cli
from wan_i2v.wan.demo import write_tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_IMAGE = os.path.join(ROOT, "example_workflows", "wan_i2v_input.jpg")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(str(root))
    return str(root)


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    out = tmp_path / "output"
    monkeypatch.setenv("WAN_I2V_OUTPUT_DIR", str(out))
    monkeypatch.setenv("WAN_I2V_DEBUG_SIZE", "64x64x5")
    monkeypatch.delenv("WAN_I2V_MODELS_DIR", raising=False)
    return out


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """http://127.0.0.1:PORT/ serving the example image and a text file; stopped afterwards."""
    root = tmp_path_factory.mktemp("served")
    shutil.copy(EXAMPLE_IMAGE, root / "cat.jpg")
    (root / "notes.txt").write_text("not a picture")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_cli(capsys, *argv):
    code = cli.main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def read_video(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, float(s.average_rate), dict(c.metadata)


def test_request_json_with_an_image_url(models_dir, out_dir, image_server, tmp_path, capsys):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "prompt": "a cat surfing", "image_url": f"{image_server}/cat.jpg", "seed": 7,
        "num_inference_steps": 2, "frames_per_second": 8, "resolution": "480p", "acceleration": "none",
        "enable_safety_checker": True}))
    code, out, err = run_cli(capsys, "--request", str(request), "--models-dir", models_dir)
    assert code == 0, err
    response = json.loads(out.strip().splitlines()[-1])  # the hosted API's response shape
    assert set(response) == {"video", "seed"} and response["seed"] == 7
    url = response["video"]["url"]
    assert url.startswith("file://") and url.endswith(".mp4")
    path = url[len("file://"):]
    assert os.path.dirname(path) == str(out_dir)
    frames, fps, meta = read_video(path)
    assert len(frames) == 5 and frames[0].shape == (64, 48, 3) and fps == 8.0  # portrait image, 64x64 area
    assert json.loads(meta["prompt"])["seed"] == 7

    # flags override the request; the same seed gives the same video
    code, out2, err = run_cli(capsys, "--request", str(request), "--models-dir", models_dir, "--seed", "8")
    assert code == 0, err
    assert json.loads(out2.strip().splitlines()[-1])["seed"] == 8


def test_demo_runs_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAN_I2V_")}
    env["WAN_I2V_OUTPUT_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "wan", "--demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    response = json.loads(proc.stdout.strip().splitlines()[-1])
    path = response["video"]["url"][len("file://"):]
    assert os.path.dirname(path) == str(tmp_path) and isinstance(response["seed"], int)
    frames, fps, _ = read_video(path)
    assert len(frames) == 81 and fps == 16.0
    h, w, _ = frames[0].shape
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 128 * 128


def test_missing_model_files_are_listed(out_dir, tmp_path, capsys):
    empty = tmp_path / "models"
    (empty / "vae").mkdir(parents=True)
    code, out, err = run_cli(capsys, "--prompt", "x", "--image", EXAMPLE_IMAGE, "--models-dir", str(empty))
    assert code == 2 and out == ""
    for folder, name in (("diffusion_models", "wan2.1_i2v_480p_14B"), ("vae", "wan_2.1_vae.safetensors"),
                         ("text_encoders", "umt5_xxl"), ("clip_vision", "clip_vision_h.safetensors")):
        assert name in err and os.path.join(str(empty), folder) in err
    assert not out_dir.exists() or not any(out_dir.iterdir())  # the reserved name is released


@pytest.mark.parametrize("case", ["404", "refused", "not_an_image", "no_such_file"])
def test_bad_images_give_clear_errors(case, models_dir, out_dir, image_server, capsys):
    if case == "refused":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        image, expect = f"http://127.0.0.1:{port}/cat.jpg", "could not read the image"
    else:
        image, expect = {"404": (f"{image_server}/missing.jpg", "HTTP 404"),
                         "not_an_image": (f"{image_server}/notes.txt", "is not an image"),
                         "no_such_file": ("/nonexistent/cat.jpg", "could not read the image")}[case]
    code, out, err = run_cli(capsys, "--prompt", "x", "--image", image, "--models-dir", models_dir)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and expect in err and image in err
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize("prefix", ["../escape", "sub/../../escape", "ABSOLUTE"])
def test_prefix_leaving_the_output_folder_is_refused(prefix, models_dir, out_dir, tmp_path, capsys):
    if prefix == "ABSOLUTE":  # an absolute path outside the output folder
        prefix = str(tmp_path / "escape")
    before = set(os.listdir(tmp_path))
    code, out, err = run_cli(capsys, "--prompt", "x", "--image", EXAMPLE_IMAGE, "--models-dir", models_dir,
                             "--filename-prefix", prefix)
    assert code == 2 and out == "" and "filename_prefix" in err
    assert set(os.listdir(tmp_path)) - before <= {"output"}
    assert not any(name.startswith("escape") for name in os.listdir(tmp_path))


def test_memory_flags_reach_the_diffusion_model(models_dir, out_dir, image_server, tmp_path, monkeypatch, capsys):
    """--weight-dtype / --blocks-to-swap / --vram-budget-gb / --fp8-matmul configure the DiT
    (that swapping changes no result is tested in test_pipeline / test_offload); bad values
    are refused with a clear message."""
    from wan_i2v.wan import pipeline

    seen = {}
    real = pipeline.I2VPipeline.from_files.__func__

    def spy(cls, *args, **kwargs):
        pipe = real(cls, *args, **kwargs)
        seen["dit"] = pipe.dit
        return pipe

    monkeypatch.setattr(pipeline.I2VPipeline, "from_files", classmethod(spy))
    base = ["--prompt", "a cat", "--image", f"{image_server}/cat.jpg", "--seed", "3", "--models-dir", models_dir,
            "--num-inference-steps", "2", "--acceleration", "none"]
    code, out, err = run_cli(capsys, *base, "--filename-prefix", "swapped", "--blocks-to-swap", "1",
                             "--vram-budget-gb", "6", "--fp8-matmul", "off", "--weight-dtype", "fp16")
    assert code == 0, err
    settings = seen["dit"].memory_settings
    assert (settings.block_swap, settings.vram_budget_gb, settings.fp8_compute) == (1, 6.0, False)
    assert seen["dit"].blocks[0].ffn[0].weight.dtype == torch.float16
    code, _, err = run_cli(capsys, *base, "--vram-budget-gb", "-2")
    assert code == 2 and "vram_budget_gb" in err
