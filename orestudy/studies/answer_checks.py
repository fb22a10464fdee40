"""Checks of the answers trained runs give, from their trial records alone: each record calibrated on its
validation split as training does, then scored on its test split (answered share and error, prediction
sets' coverage and size), beside the point-estimate threshold. The command is `orestudy answers`.
"""
from __future__ import annotations

from pathlib import Path


COLUMNS = {  # answers() key: the table's column
    "configuration": "configuration", "seed": "seed", "n_val": "n val", "n_test": "n test",
    "threshold": "threshold", "bound": "val bound", "answered_share": "answered", "answered_error": "answered error",
    "within_target": "≤ target", "point_threshold": "point thr.", "point_answered_share": "point answered",
    "point_answered_error": "point error", "point_within_target": "point ≤ target",
    "set_coverage": "set coverage", "mean_set_size": "mean set size",
}


def split_arrays(predictions: list[list], split: str):
    """(probabilities, labels) of one split of a record's per-image rows."""
    import numpy as np

    rows = [row for row in predictions if row[0] == split]
    return np.array([row[3] for row in rows], dtype=float), np.array([row[2] for row in rows], dtype=int)


def record_answers(record: dict, target_error: float, delta: float, coverage: float) -> dict:
    """One record's answers calibrated on its validation rows and checked on its test rows."""
    from .effects import trial_label
    from ..run.evaluation import answer_metrics, calibration, point_threshold

    val_p, val_y = split_arrays(record.metrics["predictions"], "val")
    test_p, test_y = split_arrays(record.metrics["predictions"], "test")
    calibrated = calibration(val_p, val_y, target_error, delta)
    guaranteed = answer_metrics(test_p, test_y, calibrated, coverage)
    point = point_threshold(val_p.max(1), val_p.argmax(1) == val_y, target_error)
    pointed = answer_metrics(test_p, test_y, {**calibrated, "unknown_threshold": point}, coverage)
    return {"configuration": trial_label(record), "seed": record.config["seed"],
            "n_val": len(val_y), "n_test": len(test_y),
            "threshold": calibrated["unknown_threshold"], "bound": calibrated["unknown_error_bound"],
            "answered_share": guaranteed["test_answered_share"], "answered_error": guaranteed["test_answered_error"],
            "within_target": guaranteed["test_answered_error_within_target"], "point_threshold": point,
            "point_answered_share": pointed["test_answered_share"],
            "point_answered_error": pointed["test_answered_error"],
            "point_within_target": pointed["test_answered_error_within_target"],
            "set_coverage": guaranteed["test_set_coverage"], "mean_set_size": guaranteed["test_mean_set_size"]}


def answers(records: list[dict], target_error: float, delta: float, coverage: float) -> list[dict]:
    """record_answers of every finished record with per-image rows (one per configuration and seed),
    by configuration and seed."""
    from .study import unique_records

    kept = [r for r in unique_records(records) if r.status == "ok" and r.metrics.get("predictions")]
    rows = [record_answers(r, target_error, delta, coverage) for r in kept]
    return sorted(rows, key=lambda row: (row["configuration"], row["seed"]))


def summary(rows: list[dict]) -> list[dict]:
    """Per configuration: seeds, how many answer no photo, how many meet the target (guaranteed and
    point-estimate thresholds; answering none meets it), and the means of what was answered and of the
    sets (answered errors over the seeds that answered some)."""
    import numpy as np

    out = []
    for label in dict.fromkeys(row["configuration"] for row in rows):
        mine = [row for row in rows if row["configuration"] == label]
        mean = lambda key: float(np.mean([row[key] for row in mine if row[key] is not None] or [np.nan]))
        out.append({"configuration": label, "seeds": len(mine),
                    "answer none": sum(row["answered_share"] == 0 for row in mine),
                    "meet target": sum(row["within_target"] for row in mine),
                    "point meets": sum(row["point_within_target"] for row in mine),
                    "answered": mean("answered_share"), "answered error": mean("answered_error"),
                    "point answered": mean("point_answered_share"), "point error": mean("point_answered_error"),
                    "set coverage": mean("set_coverage"), "mean set size": mean("mean_set_size")})
    return out


def write(folder: Path, rows: list[dict], target_error: float, delta: float, coverage: float) -> str:
    """answers.csv (a row per record) and answers.md (per configuration, then per record); the Markdown."""
    import pandas as pd

    from ..run.reports import markdown_table

    folder.mkdir(parents=True, exist_ok=True)
    per_record = pd.DataFrame(rows, columns=list(COLUMNS))
    per_record.to_csv(folder / "answers.csv", index=False)
    shown = lambda frame: markdown_table(frame.round(3).astype(object).where(frame.notna(), "–"))
    text = "\n\n".join([
        f"Target: answered error ≤ {target_error:g} with confidence {1 - delta:g} (threshold chosen on each "
        f"run's validation split, Clopper-Pearson, SGR); prediction sets at coverage {coverage:g} (split "
        f"conformal, LAC). Realized on each run's test split. 'point': the point-estimate threshold (validation "
        f"error ≤ target), for contrast. A realized error is itself a sample of n answered test photos; a run "
        f"that answers none meets the target vacuously ('answer none').",
        shown(pd.DataFrame(summary(rows))), shown(per_record.rename(columns=COLUMNS))])
    (folder / "answers.md").write_text(text + "\n")
    return text
