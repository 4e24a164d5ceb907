"""The demo app (vlm_lab.demos) against a launched server: every tab through gradio_client, the safe launch
settings, refused uploads, `show` relaunching cleanly, and the `vlm-lab demo` CLI.

One app with every tab is launched once for the module on a free 127.0.0.1 port and closed at the end.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from vlm_lab.data.pathology import CLASS_NAMES  # noqa: E402
from vlm_lab.data.shapes import ShapesDataset  # noqa: E402
from vlm_lab.demos import app as A  # noqa: E402

from test_bad_inputs import BAD_FILES  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

SHAPES_TRUTH = ShapesDataset("heldout", n=1, seed=3, image_size=32)
SHAPES_CLASS = SHAPES_TRUTH.class_names[SHAPES_TRUTH[0]["labels"]]


@pytest.fixture(scope="module")
def models():
    return A.DemoModels()


@pytest.fixture(scope="module")
def server(models):
    app, url = A.launch(models=models, prevent_thread_lock=True, quiet=True)
    try:
        yield app, url
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(A._sample_image("shapes")).save(d / "scene.png")
    Image.fromarray(A._sample_image("pathology")).save(d / "tile.jpg", quality=95)
    return d


def _top(label: dict) -> str:
    return label["label"]


def test_launch_is_local_and_safe(server):
    app, url = server
    assert url.startswith("http://127.0.0.1:")
    assert app.share is False and app.share_url is None
    assert app.analytics_enabled is False
    assert app.max_file_size == A.LIMITS.max_bytes
    assert app._queue.max_size == A.QUEUE_SIZE
    with pytest.raises(urllib.error.HTTPError) as err:  # monitoring dashboard off
        urllib.request.urlopen(url.rstrip("/") + "/monitoring", timeout=10)
    assert err.value.code in (401, 403, 404)
    config = json.loads(urllib.request.urlopen(url.rstrip("/") + "/config", timeout=10).read())
    image_inputs = [c for c in config["components"] if c["type"] == "image" and c["props"].get("interactive") is not False]
    assert image_inputs and all(set(c["props"]["sources"]) <= {"upload", "clipboard"} for c in image_inputs)
    assert not [c for c in config["components"] if c["type"] in ("file", "uploadbutton", "fileexplorer")]


def test_zero_shot_tab_shapes(client, images):
    classes, templates = A._zero_shot_defaults(A.WORLDS[0])
    label, note = client.predict(handle_file(str(images / "scene.png")), A.WORLDS[0], classes, templates, True,
                                 api_name="/zero_shot")
    assert _top(label) == SHAPES_CLASS
    assert "ensemble" in note
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert confidences[SHAPES_CLASS] > 0.5


def test_zero_shot_tab_pathology_and_single_template(client, images):
    classes, templates = A._zero_shot_defaults(A.WORLDS[1])
    label, note = client.predict(handle_file(str(images / "tile.jpg")), A.WORLDS[1], classes, templates, False,
                                 api_name="/zero_shot")
    assert _top(label) == CLASS_NAMES["TUM"]
    assert "single template" in note


def test_retrieval_tab(client, images):
    gallery = client.predict("a red circle", 4, api_name="/retrieve_images")
    assert len(gallery) == 4
    scores = [float(item["caption"].split(" | ")[0]) for item in gallery]
    assert scores == sorted(scores, reverse=True)
    texts = client.predict(handle_file(str(images / "scene.png")), 3, api_name="/retrieve_texts")
    assert len(texts["confidences"]) == 3
    colour = SHAPES_CLASS.split()[0]
    assert colour in texts["label"]  # the closest caption names the scene's colour


def test_captioning_tab(client, images):
    for method in ("greedy", "beam", "nucleus"):
        text = client.predict(handle_file(str(images / "tile.jpg")), method, 3, 0.9, 1.0, 20, 0, api_name="/caption")
        assert isinstance(text, str) and len(text.split()) >= 3, (method, text)
    greedy = client.predict(handle_file(str(images / "tile.jpg")), "greedy", 3, 0.9, 1.0, 30, 0, api_name="/caption")
    assert any(w in greedy for w in ("tumour", "adenocarcinoma", "carcinoma")), greedy


def test_qformer_tab(client, images):
    table, maps = client.predict(handle_file(str(images / "scene.png")), "qformer.layers.2.cross_attn",
                                 api_name="/qformer_trace")
    assert "qformer.layers.0" in table and "[1, 8, 64]" in table and "language_projection" in table
    grid = np.asarray(Image.open(maps))
    assert grid.shape[0] == 2 * (64 + 4) and grid.shape[1] == 4 * (64 + 4)  # 8 queries, 4 per row


def test_vqa_tab(client, images):
    answer = client.predict(handle_file(str(images / "tile.jpg")), "What type of tissue is shown in this patch?",
                            api_name="/vqa")
    assert "adenocarcinoma" in answer  # the sample is a tumour tile (TUM)
    history, box = client.predict(handle_file(str(images / "tile.jpg")), "What type of tissue is shown in this patch?",
                                  [], api_name="/vqa_chat")
    assert box == "" and [m["role"] for m in history] == ["user", "assistant"]
    with pytest.raises(Exception, match="question: empty"):
        client.predict(handle_file(str(images / "tile.jpg")), "  ", api_name="/vqa")


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_uploads_are_refused_with_a_message_and_app_keeps_working(client, images, tmp_path, case):
    """Every bad file of tests/test_bad_inputs.py, uploaded through the app: the message reaches the user."""
    data, message = BAD_FILES[case]
    upload = tmp_path / ("upload.svg" if case == "SVG" else "upload.png")
    upload.write_bytes(data)
    classes, templates = A._zero_shot_defaults(A.WORLDS[0])
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(str(upload)), A.WORLDS[0], classes, templates, True, api_name="/zero_shot")
    assert upload.read_bytes() == data
    if case == "empty file":  # the app still answers after the refusals
        label, _ = client.predict(handle_file(str(images / "scene.png")), A.WORLDS[0], classes, templates, True,
                                  api_name="/zero_shot")
        assert _top(label) == SHAPES_CLASS


def test_bad_text_is_refused_with_a_message(client, images):
    scene = handle_file(str(images / "scene.png"))
    for classes, templates, needle in (("", "a {}", "classes: empty"), ("red circle\nblue square", "a photo", "'{}'"),
                                       ("red circle\nblue square", "a {} " + "very " * 60, "longer than"),
                                       ("red circle", "a {}", "at least two")):
        with pytest.raises(Exception, match=needle.replace("{", r"\{").replace("}", r"\}")):
            client.predict(scene, A.WORLDS[0], classes, templates, True, api_name="/zero_shot")
    with pytest.raises(Exception, match="query: empty"):
        client.predict("   ", 3, api_name="/retrieve_images")


def test_oversized_upload_is_refused(server, tmp_path):
    _, url = server
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1400, 1400, 3), dtype=np.uint8)).save(big)  # ~5.6 MiB of noise
    assert big.stat().st_size > A.LIMITS.max_bytes
    with pytest.raises(Exception):
        Client(url, verbose=False).predict(handle_file(str(big)), A.WORLDS[0], "a\nb", "{}", True,
                                           api_name="/zero_shot")


def test_show_relaunch_closes_the_previous_app(models):
    clip, tokenizer = models.get_clip()
    first = A.show("zero_shot", model=clip, tokenizer=tokenizer)
    first_url = first.local_url
    try:
        assert urllib.request.urlopen(first_url, timeout=10).status == 200
        second = A.show("zero_shot", model=clip, tokenizer=tokenizer)
        assert second is not first and not first.is_running
        with pytest.raises(Exception):
            urllib.request.urlopen(first_url, timeout=5)
        assert urllib.request.urlopen(second.local_url, timeout=10).status == 200
    finally:
        assert A.close_all() == 1
    with pytest.raises(ValueError, match="tab"):
        A.show("nope")


def test_build_app_rejects_unknown_tabs():
    with pytest.raises(ValueError, match="tabs"):
        A.build_app(("zero_shot", "nope"))
    with pytest.raises(TypeError, match="share"):
        A.launch(share="yes")


def test_cli_demo_dry_run(capsys):
    from vlm_lab.cli import main

    assert main(["demo", "--dry-run", "--tab", "captioning"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tabs"] == ["captioning"] and out["server_name"] == "127.0.0.1" and out["share"] is False
    with pytest.raises(SystemExit) as err:
        main(["demo", "--tab", "nope"])
    assert err.value.code == 2


def test_upload_helpers_accept_and_normalise():
    arr = (np.arange(40 * 50 * 3) % 256).astype(np.uint8).reshape(40, 50, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("P").save(buf, format="GIF")
    img = A.load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (50, 40)
    x = A.to_model_input(img, 32)
    assert tuple(x.shape) == (1, 3, 32, 32)


def test_zero_shot_tab_defaults_to_the_world_of_a_given_coca(models):
    coca, tok = models.get_coca()
    app = A.build_app(("zero_shot",), A.DemoModels(coca=coca, coca_tokenizer=tok))
    radios = [c for c in app.config["components"] if c["type"] == "radio"]
    assert radios and radios[0]["props"]["value"] == A.WORLDS[1]


def test_ipywidgets_versions_classify_trace_and_refuse():
    pytest.importorskip("ipywidgets")
    import datetime

    from vlm_lab.demos.widgets import qformer_widget, zero_shot_widget

    box = zero_shot_widget()
    parts = box.parts
    parts["sample"].click()
    parts["run"].click()
    assert f">{SHAPES_CLASS}<" in parts["result"].value.split("</tr>")[0]  # the top row is the true class
    parts["upload"].value = ({"name": "x.png", "type": "image/png", "size": 12, "content": memoryview(b"not an image"),
                              "last_modified": datetime.datetime.now()},)
    parts["run"].click()
    assert "refused" in parts["result"].value and "not a readable image" in parts["result"].value
    trace = qformer_widget()
    trace.parts["run"].click()
    assert "no image" in trace.parts["table"].value
    trace.parts["sample"].click()
    trace.parts["run"].click()
    assert "qformer.layers.0" in trace.parts["table"].value and trace.parts["maps"].value[:4] == b"\x89PNG"


def test_show_uses_the_given_model(images):
    from vlm_lab.models.registry import build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    blip2 = build_model("blip2", "toy", num_query_tokens=5)  # stage 1, 5 queries instead of the toy's 8
    app = A.show("qformer", model=blip2)
    try:
        table, maps = Client(app.local_url, verbose=False).predict(handle_file(str(images / "scene.png")),
                                                                   "qformer.layers.0.cross_attn",
                                                                   api_name="/qformer_trace")
        assert "[1, 5, 64]" in table and "language_projection" not in table
        assert np.asarray(Image.open(maps)).shape[:2] == (2 * (64 + 4), 4 * (64 + 4))  # 5 cells on two rows
    finally:
        assert A.close_all() == 1
