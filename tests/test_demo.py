"""The patch-size demo page (tools/demo.py) on every task that predicts: its API against the task's own prediction,
and the page itself in headless Chromium (upload, slider, queries, overlay)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading

import numpy as np
import pytest
from markers import needs_fashion_mnist
from PIL import Image
from test_predict import tiny_run, user_images

import tasks
from tasks.common.images import open_image
from tools import demo

pytestmark = needs_fashion_mnist  # every smoke config's data comes from Fashion-MNIST (the scenes' items too)

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SERVED = [name for name in tasks.TASKS if tasks.get_task(name).predict is not None]
REFUSED = [name for name in tasks.TASKS if tasks.get_task(name).predict is None]
QUERIES = ["a bag", "a shoe"]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def expected(model: demo.DemoModel, image: Image.Image, patch: int, options=None):
    """What the page must show, from the task's own predict."""
    run = model.run
    return run.task.predict(run.model, run.config, run.info, [image], patch, options or {})[0]


@pytest.fixture(scope="module")
def demos():
    return {}


def demo_of(name, demos, tmp_path_factory) -> demo.DemoModel:
    if name not in demos:
        demos[name] = demo.DemoModel(tiny_run(name, tmp_path_factory))
    return demos[name]


@pytest.mark.parametrize("name", SERVED)
def test_api_answers_with_the_tasks_prediction(name, demos, tmp_path_factory, tmp_path):
    model = demo_of(name, demos, tmp_path_factory)
    client = demo.create_app(model).test_client()
    info = client.get("/api/info").get_json()
    assert (
        info["task"] == name
        and info["examples"] == []
        and info["queries"] == ("queries" in model.run.task.predict_options)
    )
    path = user_images(tmp_path)[0]
    image = open_image(path)
    for patch in info["patch_sizes"][:2]:
        r = client.post("/api/predict", json={"image": data_url(path), "patch_size": patch}).get_json()
        want = expected(model, image, patch)
        assert r["summary"] == want.summary and r["record"] == json.loads(json.dumps(want.record))
        assert r["overlay"] == want.overlay and (r["image"] is None) == (want.image is None)
        if want.image is not None:
            got = decoded(r["image"])
            assert got.size == image.size
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.image.convert("RGB")))
        assert (r["legend"] is None) == (want.legend is None)
        grid = model.run.task.token_grid(tuple(info["image_size"]), (patch, patch))
        assert r["grid"] == list(grid) and r["patch_size"] == patch
        assert r["latency_ms"] > 0 and r["gflops"] > 0
    patch = info["patch_sizes"][0]
    asked = client.post("/api/predict", json={"image": data_url(path), "patch_size": patch, "queries": QUERIES})
    if info["queries"]:
        assert asked.get_json()["summary"] == expected(model, image, patch, {"queries": QUERIES}).summary
    else:
        assert asked.status_code == 400 and f"task {name} takes no queries" in asked.get_json()["error"]
    missing = client.post("/api/predict", json={"patch_size": patch})
    assert missing.status_code == 400 and "image is missing" in missing.get_json()["error"]


@pytest.mark.parametrize("name", REFUSED)
def test_demo_refuses_a_task_that_does_not_predict_with_its_reason(name, tmp_path_factory):
    with pytest.raises(SystemExit) as info:
        demo.DemoModel(tiny_run(name, tmp_path_factory))
    assert name in str(info.value.code) and tasks.get_task(name).predict_refusal in str(info.value.code)


def test_examples_are_offered_and_predicted(tmp_path_factory, tmp_path):
    paths = user_images(tmp_path / "examples")
    model = demo.DemoModel(tiny_run("classification", tmp_path_factory), examples=[str(tmp_path / "examples")])
    client = demo.create_app(model).test_client()
    assert len(client.get("/api/info").get_json()["examples"]) == 2
    r = client.post("/api/predict", json={"example": 1, "patch_size": 8}).get_json()
    # folders are read in sorted order: tall.jpg, then wide.png
    assert r["summary"] == expected(model, open_image(sorted(paths)[1]), 8).summary


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER and CHROMIUM):
        pytest.skip("needs Debian's chromium and chromium-driver (tools/setup.sh installs them with apt)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.parametrize("name", SERVED)
def test_page_in_headless_chromium_shows_every_task(name, browser, demos, tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    model = demo_of(name, demos, tmp_path_factory)
    path = user_images(tmp_path)[0]
    image = open_image(path)
    server = make_server("127.0.0.1", 0, demo.create_app(model))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        wait = WebDriverWait(browser, 60)
        find = browser.find_element
        wait.until(lambda b: find(By.ID, "task").text == name)
        find(By.ID, "upload").send_keys(str(path))  # the user picks a file

        def shows(patch, ticket=0):
            """What the page shows once the answer for ``patch`` (newer than ``ticket``) has arrived."""
            wait.until(lambda b: find(By.ID, "status").get_attribute("data-patch") == str(patch)
                       and int(find(By.ID, "status").get_attribute("data-ticket")) > ticket)  # fmt: skip
            picture = find(By.ID, "prediction")
            return {
                "summary": find(By.ID, "summary").text,
                "ticket": int(find(By.ID, "status").get_attribute("data-ticket")),
                "picture": picture.is_displayed(),
                "opacity": picture.value_of_css_property("opacity"),
                "grid": find(By.ID, "grid").get_attribute("data-grid"),
                "latency": find(By.ID, "latency").text,
                "legend": find(By.ID, "legend").is_displayed(),
            }

        sizes = model.patch_sizes
        for step, patch in enumerate(sizes[:2]):
            if step:
                find(By.ID, "patch").send_keys(Keys.ARROW_RIGHT)  # a user moving the slider one stop
            now = shows(patch)
            want = expected(model, image, patch)
            assert now["summary"] == want.summary.strip() and now["summary"]
            assert now["picture"] == (want.image is not None) and now["legend"] == (want.legend is not None)
            if want.image is not None:  # a map is laid half-transparent over the photo, boxes are drawn on it
                assert float(now["opacity"]) == (0.5 if want.overlay else 1.0)
            gh, gw = model.run.task.token_grid(tuple(model.image_size), (patch, patch))
            assert now["grid"] == f"{gh}x{gw}" and float(now["latency"].split()[0]) > 0
            assert find(By.ID, "patch-label").text == str(patch)
        if model.takes_queries:
            box = find(By.ID, "queries")
            assert box.is_displayed()
            box.send_keys("\n".join(QUERIES))
            find(By.ID, "run-queries").click()
            now = shows(sizes[1], now["ticket"])
            assert now["summary"] == expected(model, image, sizes[1], {"queries": QUERIES}).summary.strip()
        else:
            assert not find(By.ID, "queries").is_displayed()
        assert find(By.ID, "record").get_attribute("textContent").strip().startswith("{")
        browser.save_screenshot(str(tmp_path / f"{name}.png"))
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        server.shutdown()
