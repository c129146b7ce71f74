"""The per-class result table: in full up to 30 classes, a summary and a CSV file above that."""

import csv
import math
from pathlib import Path

from segtrain.engine.report import class_table, format_table, write_class_csv, write_metrics


def ade_like_metrics(num_classes: int = 150) -> tuple[dict, list[str]]:
    """IoU of class i = (i * 37 % 150) / 200: every value distinct and shuffled across the names;
    classes 10, 20 and 30 have no pixel (IoU and accuracy n/a)."""
    names = [f"class_{i:03d}" for i in range(num_classes)]
    iou = [(i * 37 % num_classes) / 200 for i in range(num_classes)]
    acc = [min(1.0, v + 0.1) for v in iou]
    for empty in (10, 20, 30):
        iou[empty] = acc[empty] = math.nan
    present = [v for v in iou if not math.isnan(v)]
    metrics = {"miou": sum(present) / len(present), "pixel_acc": 0.8125, "mean_acc": 0.5, "iou": iou, "acc": acc}
    return metrics, names


def test_more_than_30_classes_print_a_summary_with_the_worst_and_best():
    metrics, names = ade_like_metrics()
    text = class_table(metrics, names, csv_path="run/per_class_iou.csv")
    lines = text.splitlines()
    # title, header, "worst:", 5 rows, "best:", 5 rows, rule, mIoU, pixel acc, mean acc, n/a count
    assert len(lines) == 19, text
    assert lines[0] == "150 classes, 5 worst and 5 best by IoU: full table in run/per_class_iou.csv"
    ranked = sorted((v, n) for v, n in zip(metrics["iou"], names) if not math.isnan(v))
    worst = [line.split()[0] for line in lines[3:8]]
    best = [line.split()[0] for line in lines[9:14]]
    assert lines[2] == "worst:" and lines[8] == "best:"
    assert worst == [n for _, n in ranked[:5]]  # worst first
    assert best == [n for _, n in ranked[-5:][::-1]]  # best first
    assert worst[0] == "class_000" and lines[3].split()[1:] == ["0.00", "10.00"]
    assert best[0] == "class_077" and lines[9].split()[1] == f"{100 * 149 / 200:.2f}"  # 77 * 37 % 150 == 149
    assert lines[15].split() == ["mIoU", f"{100 * metrics['miou']:.2f}"]
    assert lines[16].split() == ["pixel", "acc", "81.25"]
    assert lines[18].startswith("IoU n/a") and lines[18].split()[2] == "3"
    assert lines[18].endswith("class_010, class_020, class_030")
    assert not any("class_050" in line for line in lines)  # a middling class is not listed


def test_up_to_max_rows_classes_print_the_full_table():
    metrics, names = ade_like_metrics()
    short = {**metrics, "iou": metrics["iou"][:30], "acc": metrics["acc"][:30]}
    assert class_table(short, names[:30]) == format_table(short, names[:30])
    assert len(class_table(short, names[:30]).splitlines()) == 1 + 30 + 4
    assert class_table(short, names[:30], max_rows=10).startswith("30 classes, 5 worst and 5 best by IoU\n")


def test_the_csv_holds_every_class_and_every_per_class_metric(tmp_path):
    metrics, names = ade_like_metrics()
    path = write_class_csv(tmp_path / "per_class.csv", metrics, names)
    assert path == tmp_path / "per_class.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 150 and list(rows[0]) == ["class", "iou", "acc"]
    assert [row["class"] for row in rows] == names
    assert rows[1]["iou"] == f"{37 / 200:.6f}" and rows[1]["acc"] == f"{37 / 200 + 0.1:.6f}"
    assert rows[10]["iou"] == rows[10]["acc"] == ""  # n/a
    assert [p.name for p in tmp_path.iterdir()] == ["per_class.csv"]  # no temporary file left behind
    # Whatever per-class lists the metrics hold become columns; scalars (miou) do not.
    extra = write_class_csv(tmp_path / "more.csv", {**metrics, "dice": [0.25] * 150}, names)
    assert extra.read_text().splitlines()[0] == "class,iou,acc,dice"


def test_write_metrics_writes_the_same_csv(tmp_path):
    metrics, names = ade_like_metrics()
    write_metrics(tmp_path, metrics, names, {"split": "val"})
    same = write_class_csv(tmp_path / "x.csv", metrics, names)
    assert (tmp_path / "per_class_iou.csv").read_text() == same.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "per_class_iou.csv", "x.csv"]


def test_one_mIoU_format_everywhere_a_person_reads_it():
    """Percent with two decimals in log lines, tables, eval's line, info and the sweep summary; files keep fractions."""
    from segtrain.display import percent

    assert [percent(v) for v in (0.5679, 1.0, 0.0, math.nan, None, -1.0)] == ["56.79", "100.00", "0.00", "n/a", "n/a",
                                                                               "n/a"]
    sources = Path(__file__).resolve().parents[1] / "segtrain"
    for path in sources.rglob("*.py"):  # no mIoU formatted as a fraction (%.4f / :.4f) next to the word mIoU
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "mIoU" in line and (".4f" in line or ".3f" in line):
                raise AssertionError(f"{path.name}:{number} formats an mIoU as a fraction: {line.strip()}")
