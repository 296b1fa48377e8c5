"""The Gradio page in a real headless browser (Debian's chromium through Selenium and chromedriver):
upload an image, submit, read the caption from the page, then ask a question; screenshots are saved.

`make test` installs chromium and chromium-driver (`make browser`); the browser test skips, saying so,
only where they are absent."""
from __future__ import annotations

import io
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

# gradio's own route code uses a starlette constant that starlette now deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"no headless browser: chromium ({CHROMIUM}) or chromedriver ({CHROMEDRIVER}) is not installed; "
                    "run `make browser` (apt-get install chromium chromium-driver) to enable this test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def page(trained_caption_run, monkeypatch):
    """The demo of the trained captioner, launched in this process on a free loopback port."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from lavis_ext.inference import load
    from lavis_ext.serve.gradio_app import build_demo

    predictor = load(trained_caption_run, device="cpu")
    demo = build_demo(predictor)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    yield predictor, f"http://127.0.0.1:{port}/"
    demo.close()


def _output_text(driver) -> str:
    return driver.find_element("css selector", "#output textarea").get_property("value") or ""


def test_caption_and_answer_in_a_real_browser(page, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    from lavis_ext.datasets.synthetic import make_example

    predictor, url = page
    image_path = tmp_path / "scene.png"
    Image.open(io.BytesIO(make_example(0, "test", 2)["jpg"])).convert("RGB").save(image_path)
    image = Image.open(image_path).convert("RGB")
    expected_caption = predictor.caption([image])[0].strip()
    question = "what colour is the shape?"
    expected_answer = predictor.answer([image], [question])[0].strip()

    browser.get(url)
    wait = WebDriverWait(browser, 60)
    submit = wait.until(lambda d: d.find_element("css selector", "#submit"))
    submit.click()  # nothing uploaded yet: the page says what to do
    wait.until(lambda d: "Upload an image first." in d.find_element("tag name", "body").text)
    upload = wait.until(lambda d: d.find_element("css selector", "#image input[type=file]"))
    upload.send_keys(str(image_path))
    wait.until(lambda d: d.find_elements("css selector", "#image img"))  # the preview: the upload is done
    browser.find_element("css selector", "#submit").click()
    wait.until(lambda d: _output_text(d).strip())
    assert _output_text(browser) == expected_caption
    browser.save_screenshot(str(tmp_path / "gradio_caption.png"))

    browser.find_element("css selector", "#question textarea").send_keys(question)
    browser.find_element("css selector", "#submit").click()
    wait.until(lambda d: _output_text(d) != expected_caption or expected_answer == expected_caption)
    wait.until(lambda d: _output_text(d).strip())
    assert _output_text(browser) == expected_answer
    shot = tmp_path / "gradio_answer.png"
    browser.save_screenshot(str(shot))
    with Image.open(shot) as screenshot:
        assert screenshot.format == "PNG" and screenshot.size[0] >= 800


def test_share_is_off_and_host_is_local_by_default():
    from lavis_ext.serve.gradio_app import build_parser

    args = build_parser().parse_args(["--checkpoint", "runs/x"])
    assert args.share is False and args.host == "127.0.0.1"
    assert build_parser().parse_args(["--cfg-path", "p.yaml", "--share"]).share is True


def test_sliders_are_bounded_by_decoding_limits():
    from types import SimpleNamespace

    from lavis_ext.inference import Decoding
    from lavis_ext.serve.gradio_app import SLIDERS, _decoding, build_demo

    predictor = SimpleNamespace(caption_decoding=Decoding(), answer_decoding=Decoding(), arch="blip2_opt_ext",
                                source="runs/x/checkpoint_best.safetensors")
    demo = build_demo(predictor)
    sliders = {block.elem_id: block for block in demo.blocks.values() if block.__class__.__name__ == "Slider"}
    for name, *_ in SLIDERS:
        slider = sliders[name.replace("_", "-")]
        assert (slider.minimum, slider.maximum) == Decoding.LIMITS[name]
    values = [getattr(Decoding(), name) for name, *_ in SLIDERS]
    assert _decoding(Decoding(), True, False, values) == Decoding()
    assert _decoding(Decoding(), False, True, [3, *values[1:]]).num_beams == 3
    with pytest.raises(ValueError, match="num_beams=11"):
        _decoding(Decoding(), False, False, [11, *values[1:]])
