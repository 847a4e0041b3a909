import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from compresspipe.report.build import build_report
from compresspipe.report.html import pareto_optimal, render_html

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SVG = "{http://www.w3.org/2000/svg}"


def _row(index, name, kind, acc, bytes_, lat1, notes=(), details=None, params=None):
    return {"index": index, "name": name, "type": name.split("-")[0], "kind": kind, "folder": f"{index:02d}-{name}",
            "accuracy": acc, "loss": 1 - acc, "params": params or bytes_ // 4, "nonzero_params": bytes_ // 4,
            "sparsity": 0.0, "bytes": bytes_, "macs": bytes_ // 2, "latency_ms": {"1": lat1, "8": 4 * lat1},
            "seconds": 1.0, "notes": list(notes), "details": details}


def make_report():
    """Five stages: baseline (untrained), train, prune (smaller, faster), quantize (smallest), and a
    dominated stage; `train` and `<b>prune&co</b>` are both Pareto-optimal on size, and names/notes hold
    markup that must come out escaped."""
    table = {"per layer": [{"layer": "fc1", "before": 64, "after": 32, "kept": 0.5},
                           {"layer": "fc<2>", "before": 32, "after": 16, "kept": 0.5}]}
    rows = [
        _row(0, "baseline", "weights", 0.10, 400_000, 0.40),
        _row(1, "train", "weights", 0.97, 400_000, 0.40, notes=["best epoch 3 of 5"]),
        _row(2, "<b>prune&co</b>", "structural", 0.95, 200_000, 0.25, notes=["<script>alert(1)</script>"],
             details={"tables": table}),
        _row(3, "quantize", "quantized", 0.93, 110_000, 0.30),
        _row(4, "worse", "weights", 0.90, 300_000, 0.50),
    ]
    report = build_report("demo & <co>", rows, "train", "complete")
    report["gates"] = [{"scope": "run", "gate": "max_accuracy_drop", "value": 0.04, "limit": 0.05, "passed": True}]
    return report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.rows, self.circles, self.texts, self.tags = [], [], [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "tr" and "stages" in self.stack_classes("table"):
            self.rows.append(a)
        if tag == "circle":
            self.circles.append(a)
        self.stack.append((tag, a))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        self.texts.append(data)

    def stack_classes(self, tag):
        return " ".join(a.get("class") or "" for t, a in self.stack if t == tag)


def test_pareto_optimal():
    pts = [(4, 0.10), (4, 0.97), (2, 0.95), (1.1, 0.93), (3, 0.90), None, (1.1, 0.93)]
    assert pareto_optimal(pts) == [False, True, True, True, False, False, True]
    assert pareto_optimal([(1, 0.5)]) == [True]


def test_page_has_a_row_and_a_point_per_stage_and_escapes_user_text():
    report = make_report()
    page = render_html(report)
    parser = _Collect()
    parser.feed(page)
    assert len(parser.rows) == 1 + 5  # header row + one per stage
    assert sum("reference" in (r.get("class") or "") for r in parser.rows) == 1
    # Two plots (size, latency at batch 1), each with one point per stage, named by the stage.
    assert len(parser.circles) == 10
    names = [s["name"] for s in report["stages"]]
    for i in (0, 1):
        assert sorted(c["data-stage"] for c in parser.circles[5 * i: 5 * i + 5]) == sorted(names)
    size_front = {c["data-stage"] for c in parser.circles[:5] if "pareto" in c["class"]}
    assert size_front == {"train", "<b>prune&co</b>", "quantize"}
    lat_front = {c["data-stage"] for c in parser.circles[5:] if "pareto" in c["class"]}
    assert lat_front == {"train", "<b>prune&co</b>"}  # quantize is slower than prune and less accurate
    assert page.count('class="front"') == 2
    # Untrusted text never becomes markup; it survives as text.
    assert "script" not in parser.tags and "b" not in parser.tags
    assert ": <script>alert(1)</script>" in "".join(parser.texts)
    assert "&lt;b&gt;prune&amp;co&lt;/b&gt;" in page
    # Self-contained: no external resources of any kind.
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<script" not in page and "<link" not in page
    # Notes, gates and per-layer tables are there, as in report.md.
    text = " ".join(parser.texts)
    assert "best epoch 3 of 5" in text and "Quality gates: all passed" in text
    assert "<b>prune&co</b>: per layer" in text and "fc<2>" in text


def test_page_is_well_formed_xml():
    page = render_html(make_report())
    assert page.startswith("<!DOCTYPE html>\n")
    root = ET.fromstring(page.split("\n", 1)[1])
    svgs = root.findall(f".//{SVG}svg")
    assert len(svgs) == 2
    assert [len(s.findall(f"{SVG}circle")) for s in svgs] == [5, 5]
    cells = [td for tr in root.iter("tr") for td in tr.findall("td")]
    assert any(td.text == "97.00%" for td in cells)


def test_without_latency_or_stages_it_still_renders():
    report = make_report()
    for s in report["stages"]:
        s["latency_ms"] = {}
        s["vs_reference"]["speedup"] = {}
    page = render_html(report)
    assert page.count("<svg") == 1 and "No latency was measured" in page
    report["stages"] = []
    page = render_html(report)
    ET.fromstring(page.split("\n", 1)[1])
    assert "no data" in page


def test_point_labels_do_not_overlap_and_coincident_points_share_one():
    report = make_report()
    twin = dict(report["stages"][3], name="export", index=5)  # the export of quantize: same file, same point
    report["stages"].append(twin)
    page = render_html(report)
    svg = ET.fromstring(page.split("\n", 1)[1])
    for plot in svg.iter(f"{SVG}svg"):
        boxes = []
        for label in plot.iter(f"{SVG}text"):
            if "label" not in (label.get("class") or ""):
                continue
            width = 6.6 * len(label.text) + 4
            x, y = float(label.get("x")), float(label.get("y"))
            left = x if label.get("text-anchor") == "start" else x - width
            boxes.append((left, y - 11, left + width, y + 3, label.text))
        assert any(b[4] == "quantize, export" for b in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
                assert apart, (a, b)


def test_the_header_says_when_gates_failed():
    report = make_report()
    report["gates"][0]["passed"] = False
    report["gates_passed"] = False
    assert "Status: complete, gates FAILED" in render_html(report)


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason="chromium is not installed (the test set-up installs it: "
                                                       "make system-deps)")
@pytest.mark.parametrize("width", [1400, 800])
def test_headless_chromium_screenshot(tmp_path, width):
    page = tmp_path / "report.html"
    page.write_text(render_html(make_report()), encoding="utf-8")
    png = tmp_path / f"shot-{width}.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1400", f"--screenshot={png}",
           page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert int.from_bytes(data[16:20], "big") == width  # the page was laid out at that width


def test_a_regression_report_leads_with_its_metric_and_lower_is_better():
    from compresspipe.report.build import table_rows

    rows = []
    for i, (name, mse, size) in enumerate((("baseline", 0.9, 400_000), ("train", 0.10, 400_000),
                                           ("prune", 0.12, 200_000), ("worse", 0.30, 300_000))):
        row = _row(i, name, "weights", 0.0, size, 0.4)
        row.update(accuracy=None, metric="mse", score=mse, metrics={"mse": mse, "mae": mse / 2}, loss=mse)
        rows.append(row)
    report = build_report("reg", rows, "train", "complete")
    header, cells = table_rows(report)
    assert header[4:6] == ["mse", "Δ"] and cells[2][4:6] == ["0.12", "+0.02"]
    page = render_html(report)
    assert "mse vs size" in page and "mse (lower is better)" in page and "accuracy (%)" not in page
    size_plot = page.split("<svg")[1]
    assert size_plot.count('class="point pareto"') == 2  # train (best mse) and prune (smallest); worse is dominated
