"""`rsjax report` on a real tiny training run and on a folder of runs; and the
TensorBoard event files that run writes, read back independently."""
from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import jax
import numpy as np
import pytest
from PIL import Image

from event_files import read_events
from trainer_utils import tiny_fusion_config

G_LR, D_LR = 2e-4, 4e-4


@pytest.fixture(scope="module")
def fusion_run(demo_data_dir, tmp_path_factory):
    """4 steps of pix2pix: metrics every 2 steps, grids and validation at step 2,
    the learning rate halved by step 4, the final evaluation on the test split."""
    from rsjax.trainers import fusion

    config = tiny_fusion_config(demo_data_dir, "pix2pix", steps=4)
    config.image_every_steps = 2
    config.eval_every_steps = 2
    config.eval_max_batches = 1
    config.optim.g_lr, config.optim.d_lr = G_LR, D_LR
    config.optim.decay_start_step = 2          # constant to step 2, then linear to 0 at 4
    workdir = tmp_path_factory.mktemp("runs") / "pix2pix_demo"
    fusion.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    return workdir


def test_training_run_event_files(fusion_run):
    """Losses, learning rates, steps/s, validation and the image grids, in the
    event files beside metrics.jsonl, with the values the run logged."""
    events = read_events(fusion_run)
    scalars, images = events["scalars"], events["images"]
    assert [s for s, _ in scalars["g_loss"]] == [2, 4]
    # Step 2 was made by the 2nd update (optax count 1): still the base rate;
    # step 4 by the 4th (count 3): base * (1 - (3 - 2) / (4 - 2)).
    assert scalars["learning_rate/generator"] == [(2, pytest.approx(G_LR)),
                                                  (4, pytest.approx(G_LR / 2))]
    assert scalars["learning_rate/discriminator"] == [(2, pytest.approx(D_LR)),
                                                      (4, pytest.approx(D_LR / 2))]
    assert [s for s, _ in scalars["steps_per_second"]] == [2, 4]
    assert all(v > 0 for _, v in scalars["steps_per_second"])
    assert [s for s, _ in scalars["val_psnr"]] == [2] and [s for s, _ in scalars["test_psnr"]] == [4]

    from rsjax import logging_utils
    records = {r["step"]: r for r in logging_utils.read_metrics(fusion_run)}
    for tag, values in scalars.items():           # the JSON lines hold the same numbers
        for step, value in values:
            assert records[step][tag] == pytest.approx(value, rel=1e-6), tag

    # The grids: the same pixels as the PNGs the run wrote.
    assert [s for s, _ in images["images"]] == [2, 4]
    for step, pixels in images["images"]:
        png = np.asarray(Image.open(fusion_run / "images" / f"step_{step:07d}.png").convert("RGB"))
        assert np.array_equal(pixels, png)
    [(step, pixels)] = images["test_images"]
    assert step == 4
    assert np.array_equal(pixels, np.asarray(Image.open(fusion_run / "eval_test.png").convert("RGB")))


def test_tensorboard_reads_the_run_event_files(fusion_run):
    """`tensorboard --logdir WORKDIR` (README): TensorBoard's own reader, the one
    its server uses, finds every tag with the values and pixels the independent
    reader finds."""
    import io

    from tensorboard.backend.event_processing import event_accumulator

    ours = read_events(fusion_run)
    accumulator = event_accumulator.EventAccumulator(
        str(fusion_run), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert sorted(tags["scalars"]) == sorted(ours["scalars"]) and "g_loss" in tags["scalars"]
    for tag, values in ours["scalars"].items():
        assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == \
            [(step, pytest.approx(value)) for step, value in values], tag
    assert sorted(tags["images"]) == sorted(ours["images"]) == ["images", "test_images"]
    for tag, grids in ours["images"].items():
        read = accumulator.Images(tag)
        assert [e.step for e in read] == [step for step, _ in grids]
        for event, (_, pixels) in zip(read, grids):
            assert (event.height, event.width) == pixels.shape[:2]
            png = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
            assert np.array_equal(np.asarray(png), pixels)


# --------------------------------------------------------------------------- HTML checks

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class _Checker(HTMLParser):
    """Tag balance (every element closed, in order), the doctype, ids, and
    every src/href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.refs, self.ids, self.doctype = [], [], [], set(), False
        self.tags: dict[str, int] = {}

    def handle_decl(self, decl):
        self.doctype |= decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        if "id" in attrs:
            if attrs["id"] in self.ids:
                self.errors.append(f"duplicate id {attrs['id']}")
            self.ids.add(attrs["id"])
        for name in ("src", "href"):
            if name in attrs:
                self.refs.append((tag, attrs[name]))
        if tag == "img" and not attrs.get("alt"):
            self.errors.append(f"img without alt: {attrs}")
        if tag not in VOID:
            self.stack.append((tag, self.getpos()))

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:
            self.errors.append(f"<{tag}/> is not a void element")
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"</{tag}> closes a void element")
        elif not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_report(html_path: Path) -> _Checker:
    """The page is balanced HTML and every file it refers to exists beside it."""
    text = html_path.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.doctype and not checker.errors and not checker.stack, (
        checker.errors, checker.stack)
    assert all(checker.tags.get(t) == 1 for t in ("html", "head", "body", "title")), checker.tags
    for tag, ref in checker.refs:
        url = urlparse(ref)
        assert not url.scheme and not url.netloc and not url.path.startswith("/"), ref  # relative
        if ref.startswith("#"):
            assert ref[1:] in checker.ids, ref
            continue
        target = html_path.parent / unquote(url.path)
        assert target.is_file(), ref
        if tag == "img":
            image = Image.open(target)
            assert image.format == "PNG"
            assert len(np.unique(np.asarray(image.convert("L")))) > 2, ref   # not blank
    return checker


def _srcs(checker):
    return [ref for tag, ref in checker.refs if tag == "img"]


def test_report_of_one_run(fusion_run, tmp_path, capsys):
    from rsjax import html_report as report

    assert report.main(["--workdir", str(fusion_run), "--out_dir", str(tmp_path / "out")]) == 0
    assert '"report":' in capsys.readouterr().out
    html_path = tmp_path / "out" / "report.html"
    copied = tmp_path / "elsewhere"                      # relative paths: the folder travels
    shutil.copytree(tmp_path / "out", copied)
    checker = check_report(copied / "report.html")
    slug = "pix2pix_demo"
    srcs = _srcs(checker)
    for curve in ("train_g_loss", "train_d_loss", "train_g_l1", "learning_rate", "speed", "eval_psnr", "eval_ssim", "eval_sam"):
        assert f"{slug}/{curve}.png" in srcs, curve
    assert f"{slug}/latest_step_0000004.png" in srcs and f"{slug}/eval_test.png" in srcs
    assert (copied / slug / "latest_step_0000004.png").read_bytes() == (
        fusion_run / "images" / "step_0000004.png").read_bytes()
    text = html_path.read_text()
    psnr = __import__("json").loads((fusion_run / "eval_test.json").read_text())["psnr"]
    assert f"<td>psnr</td><td>{psnr:.4g}</td>" in text                      # the evaluation table
    assert f'href="#{slug}"' in text and "pix2pix_unet" in text             # summary row

    # Default output: WORKDIR/report, replaced by a second report, no leftovers.
    assert report.main(["--workdir", str(fusion_run)]) == 0
    assert report.main(["--workdir", str(fusion_run)]) == 0
    check_report(fusion_run / "report" / "report.html")
    assert not [p for p in fusion_run.iterdir() if p.name.startswith(".report")]


def test_report_of_a_folder_of_runs(fusion_run, tmp_path):
    from rsjax import html_report as report

    root = tmp_path / "experiments"
    ignore = shutil.ignore_patterns("checkpoints", "report")
    shutil.copytree(fusion_run, root / "a", ignore=ignore)
    shutil.copytree(fusion_run, root / "group" / "b run", ignore=ignore)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    # A second run that is still at its first log line, half-way through another.
    metrics = (root / "group" / "b run" / "metrics.jsonl")
    metrics.write_text(metrics.read_text().splitlines()[0] + '\n{"step": 4, "g_lo')

    result = report.write_report(str(root))
    assert result["runs"] == ["a", "group/b run"]
    checker = check_report(root / "report" / "report.html")
    assert {"a", "group_b_run"} <= checker.ids
    links = [ref for tag, ref in checker.refs if tag == "a" and ref.startswith("#")]
    assert links == ["#a", "#group_b_run"]                   # the summary table, a row per run
    assert "group_b_run/train_g_loss.png" in _srcs(checker)
    assert "a/eval_test.png" in _srcs(checker)


def test_report_user_errors_exit_2_and_create_nothing(tmp_path, capsys):
    from rsjax import html_report as report

    assert report.main(["--workdir", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.main(["--workdir", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["sub"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    assert report.main(["--workdir", str(run), "--out_dir", str(tmp_path / "precious")]) == 2
    assert "not a report folder" in capsys.readouterr().err
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2}\n')
    assert report.main(["--workdir", str(run)]) == 2
    assert "metrics.jsonl:2: not a JSON object" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_report_segmentation_scores_as_tables(tmp_path):
    """A segmentation run's files (as segmentation.train_and_evaluate writes them):
    per-class lists as a table with class names, the confusion matrix as a grid,
    NaN (a class absent from the split) shown, not dropped."""
    import json

    from rsjax import html_report as report, metrics
    from rsjax.data.contract import LULC_CLASSES

    run = tmp_path / "seg_real"
    run.mkdir()
    lines = [{"step": s, "loss": 2.0 / s, "train_accuracy": 0.1 * s, "nonfinite": 0.0,
              "steps_per_second": 3.0, "learning_rate/model": 1e-3} for s in (10, 20)]
    lines.append({"step": 20, "val_miou": 0.3, "val_accuracy": 0.6, "val_num_pixels": 4096})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cm = np.diag(np.arange(9))                 # class 0 absent: its IoU is NaN
    cm[1, 2] = 5
    scores = metrics.segmentation_scores(cm)
    (run / "eval_test.json").write_text(json.dumps(
        {"step": 20, **scores, "confusion_matrix": cm.tolist()},
        default=lambda x: np.asarray(x).tolist()))
    report.write_report(str(run))
    html_path = run / "report" / "report.html"
    checker = check_report(html_path)
    assert {"seg_real/train_loss.png", "seg_real/train_train_accuracy.png",
            "seg_real/learning_rate.png", "seg_real/eval_miou.png",
            "seg_real/eval_accuracy.png"} <= set(_srcs(checker))
    assert "seg_real/eval_num_pixels.png" not in _srcs(checker)      # counts: no curve
    text = html_path.read_text()
    assert "<th>class</th><th>per_class_iou</th><th>per_class_accuracy</th>" in text
    assert f"<td>{LULC_CLASSES[0]}</td><td>nan</td><td>nan</td>" in text
    iou_trees = scores["per_class_iou"][1]
    assert f"<td>{LULC_CLASSES[1]}</td><td>{iou_trees:.4g}</td>" in text
    assert "confusion_matrix (rows: truth, columns: prediction)" in text
    assert f"<td>{LULC_CLASSES[1]}</td><td>0</td><td>1</td><td>5</td>" in text   # row 1 of cm
    assert f"<td>miou</td><td>{scores['miou']:.4g}</td>" in text


def test_report_folder_and_files_follow_the_umask(tmp_path):
    """The report is built in a mkdtemp folder (0o700) and renamed into place: it
    gets the modes of a folder the user makes (0o777 less the umask), not 0o700."""
    import os
    import stat

    from rsjax import html_report as report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    for mask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o002, 0o775, 0o664)):
        old = os.umask(mask)
        try:
            result = report.write_report(str(run), str(tmp_path / f"report_{mask:03o}"))
        finally:
            os.umask(old)
        page = Path(result["report"])
        folders = [page.parent] + [p for p in page.parent.rglob("*") if p.is_dir()]
        files = [p for p in page.parent.rglob("*") if p.is_file()]
        assert len(folders) >= 2 and len(files) >= 2          # the page, a run's folder and curve
        assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {dir_mode}
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {file_mode}


# -- the page in a real browser (Debian's Chromium, headless; .ci/run installs it) ---------------

# Appended to a copy of the page: once everything has loaded, it writes what the browser
# made of the page into the DOM, which --dump-dom prints.
_BROWSER_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(img => ({
    src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0,
    shown: img.getBoundingClientRect().width > 0}));
  const out = document.createElement("pre");
  out.id = "rsjax-probe";
  out.textContent = JSON.stringify({images, pwned: window.pwned === 1, title: document.title,
                                    height: document.body.scrollHeight,
                                    text: document.body.innerText});
  document.body.appendChild(out);
});
</script>"""


def browser() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    return path


def rendered(page: Path, tmp_path: Path) -> dict:
    """What headless Chromium made of `page` (see _BROWSER_PROBE)."""
    import html
    import json
    import re
    import subprocess

    probe = page.with_name("probed.html")
    probe.write_text(page.read_text(encoding="utf-8") + _BROWSER_PROBE, encoding="utf-8")
    out = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    probe_out = re.search(r'<pre id="rsjax-probe">(.*?)</pre>', out.stdout, re.S)
    assert probe_out, out.stdout[-2000:]
    return json.loads(html.unescape(probe_out.group(1)))


def test_report_renders_in_a_real_browser_with_every_image_and_names_escaped(fusion_run, tmp_path):
    """A run named with HTML in it: the browser shows the name as text (no element,
    no script run), every figure loads and is laid out, and the page has a body."""
    from rsjax import html_report as report

    hostile = '<img src=x onerror="window.pwned=1">'
    root = tmp_path / "runs"
    shutil.copytree(fusion_run, root / hostile, ignore=shutil.ignore_patterns("checkpoints", "report"))
    report.write_report(str(root))
    page = rendered(root / "report" / "report.html", tmp_path)
    assert not page["pwned"]
    assert hostile in page["text"]                              # shown, as text
    images = page["images"]
    assert len(images) >= 8 and all(i["loaded"] and i["shown"] for i in images), images
    assert page["title"] and page["height"] > 1000
