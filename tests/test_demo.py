"""The patch-size demo page (tools/demo.py): its API against the model, and the page itself in headless Chromium."""

import shutil
import threading

import pytest
import torch
from markers import needs_fashion_mnist

from tools import demo, train

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from markers import HAS_FASHION_MNIST

    if not HAS_FASHION_MNIST:
        pytest.skip("Fashion-MNIST IDX files not found (see tests/markers.py)")
    workdir = tmp_path_factory.mktemp("demo")
    train.main(["--config", "configs/classification/fashion_mnist.py:runlocal", "--workdir", str(workdir),
                "--set", "eval.final=False", "train.steps=20"])  # fmt: skip
    return demo.DemoModel(workdir)


def expected(model: demo.DemoModel, index: int, patch: int) -> dict:
    """What the page must show for validation image ``index`` at ``patch``, computed from the model directly."""
    with torch.no_grad():
        probs = model.model(model.examples[index : index + 1], patch_size=patch)[0].softmax(-1)
    grid = model.image_size // patch
    return {"top": model.classes[int(probs.argmax())], "score": f"{100 * float(probs.max()):.1f} %",
            "grid": f"{grid}x{grid}", "gflops": f"{model.gflops(patch):.4f}"}  # fmt: skip


@needs_fashion_mnist
def test_api_answers_with_the_models_prediction_and_names_bad_requests(demo_model):
    client = demo.create_app(demo_model).test_client()
    info = client.get("/api/info").get_json()
    assert info["patch_sizes"] == [12, 8, 6] and len(info["examples"]) == demo.NUM_EXAMPLES
    for patch in info["patch_sizes"]:
        r = client.post("/api/predict", json={"example": 1, "patch_size": patch}).get_json()
        want = expected(demo_model, 1, patch)
        assert r["prediction"][0]["label"] == want["top"] and f"{r['gflops']:.4f}" == want["gflops"]
        assert r["grid"] == [demo_model.image_size // patch] * 2 and r["latency_ms"] > 0
        assert r["relevance"].startswith("data:image/png;base64,")
    bad = client.post("/api/predict", json={"example": 1, "patch_size": 5})
    assert bad.status_code == 400 and "patch size 5 is not one of" in bad.get_json()["error"]
    assert (
        "example 99 does not exist"
        in client.post("/api/predict", json={"example": 99, "patch_size": 8}).get_json()["error"]
    )


@needs_fashion_mnist
@pytest.mark.skipif(
    not (CHROMEDRIVER and CHROMIUM),
    reason="needs Debian's chromium and chromium-driver (tools/setup.sh installs them with apt)",
)
def test_page_in_headless_chromium_follows_the_slider(demo_model, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, demo.create_app(demo_model))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,800",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        wait = WebDriverWait(browser, 60)

        def shows(patch):
            wait.until(lambda b: b.find_element(By.ID, "status").get_attribute("data-patch") == str(patch))
            return {
                "top": browser.find_element(By.CSS_SELECTOR, "#prediction li .label").text,
                "score": browser.find_element(By.CSS_SELECTOR, "#prediction li .num").text,
                "grid": browser.find_element(By.ID, "grid-size").text,
                "gflops": browser.find_element(By.ID, "gflops").text,
                "canvas": browser.find_element(By.ID, "grid").get_attribute("data-grid"),
                "latency": browser.find_element(By.ID, "latency").text,
            }

        first = shows(12)  # the slider starts at the first patch size
        want = expected(demo_model, 0, 12)
        assert {k: first[k] for k in want} == want and first["canvas"] == want["grid"]
        slider = browser.find_element(By.ID, "patch")
        slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # a user moving it two stops: patch 6
        now = shows(6)
        want = expected(demo_model, 0, 6)
        assert {k: now[k] for k in want} == want and now["canvas"] == "4x4"
        assert now["gflops"] != first["gflops"] and float(now["latency"].split()[0]) > 0
        assert browser.find_element(By.ID, "patch-label").text == "6"
        browser.save_screenshot(str(tmp_path / "demo.png"))
        assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        browser.quit()
        server.shutdown()


def test_api_shows_a_segmentation_mask(tmp_path):
    workdir = tmp_path / "seg"
    train.main(["--config", "configs/segmentation/scenes.py:runlocal", "--workdir", str(workdir),
                "--set", "train.steps=2", "eval.final=False"])  # fmt: skip
    model = demo.DemoModel(workdir)
    client = demo.create_app(model).test_client()
    r = client.post("/api/predict", json={"example": 0, "patch_size": 8}).get_json()
    with torch.no_grad():
        labels = model.model(model.examples[:1], patch_size=8)[0].argmax(0)
    shares = {model.classes[int(c)]: float((labels == c).float().mean()) for c in labels.unique()}
    assert {p["label"]: p["score"] for p in r["prediction"]} == pytest.approx(shares, abs=1e-4)
    assert r["overlay"].startswith("data:image/png;base64,") and r["grid"] == [6, 6]  # 48 px padded to 48 at p8
