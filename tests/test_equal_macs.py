"""Equal-MACs comparison tables from the study's rows."""

from __future__ import annotations

import pandas as pd

from amg.reporting.equal_macs import comparison_tables, section, study_rows


def _row(config, batch, speedup, occluded_mAP, saving=0.2, device="cpu-2c", run="r1"):
    return {"device_id": device, "model": "small", "backend": "cpu", "precision": "fp32", "run_id": run,
            "config_id": config,
            "batch": batch, "speedup": speedup, "macs_saving": saving, "peak_rss_mb": 400.0,
            "query_rank1": 0.9, "query_mAP": 0.8, "occluded_rank1": 0.4, "occluded_mAP": occluded_mAP}


def _frame(*rows):
    return pd.DataFrame(list(rows))


STUDY = _frame(
    _row("unpruned", 1, None, 0.30, saving=0.0), _row("unpruned", 32, None, 0.30, saving=0.0),
    _row("unpruned@ft800", 1, 1.0, 0.36, saving=0.0), _row("unpruned@ft300", 1, 1.0, 0.33, saving=0.0),
    _row("save0.2:heads:random", 1, 1.20, 0.20), _row("save0.2:heads:random", 32, 1.10, 0.20),
    _row("save0.2:heads:amg", 1, 1.21, 0.25), _row("save0.2:heads:amg", 32, 1.15, 0.25),
    _row("save0.2:heads:amg@ft300", 1, 1.19, 0.31),
    _row("save0.2:heads:amg+tokens:amg", 1, 1.18, 0.24),
    _row("save0.2:tokens:tome", 1, 0.95, 0.29),
    _row("save0.3:tokens:tome", 1, 1.05, 0.27, saving=0.3),
    _row("heads0.25:amg", 1, 1.1, 0.28, saving=0.08),  # a ratio configuration: not in the study
    _row("cls-block", 1, 1.04, 0.30, saving=0.129),  # the class-token block alone: not a reference
)


def _body(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_study_rows_keep_targets_and_references_only():
    rows = study_rows(STUDY)
    assert "heads0.25:amg" not in set(rows["config_id"])
    assert sorted(rows["target"].dropna().unique()) == [0.2, 0.3]
    assert rows.loc[rows["config_id"] == "save0.2:heads:amg@ft300", "schedule_label"].item() == "ft300"


def test_one_table_per_target_with_references_families_and_bold_winners():
    tables = dict(comparison_tables(STUDY))
    assert list(tables) == ["cpu-2c / small / cpu: 20% of MACs saved", "cpu-2c / small / cpu: 30% of MACs saved"]
    body = _body(tables["cpu-2c / small / cpu: 20% of MACs saved"])
    names = [(row[0], row[1]) for row in body]
    assert names == [("unpruned", "—"), ("unpruned", "ft300"), ("unpruned", "ft800"), ("**heads:amg**", "one-shot"),
                     ("heads:random", "one-shot"), ("**heads:amg**", "ft300"), ("**tokens:tome**", "one-shot"),
                     ("**heads:amg+tokens:amg**", "one-shot")]
    amg = body[3]
    # MACs saved, speed-up b1 and b32, latency saving / MACs saving (1 - 1/1.21 = 17.4% of 20%), memory
    assert amg[2:8] == ["20.0", "1.21", "1.15", "0.87", "0.65", "400"]
    assert amg[-3:-1] == ["100%", "83%"]  # occluded R1 and mAP as a share of the unpruned model's
    assert amg[-1] == "—"  # no per-query record behind these rows: no paired comparison
    assert body[6][4] == body[6][6] == "—"  # tome has no batch-32 row here


def test_section_is_empty_without_a_study():
    assert section(STUDY[~STUDY["config_id"].str.startswith("save")]) == ""
    assert section(STUDY).startswith("## Equal-MACs comparison")


def test_against_random_the_difference_is_paired_over_queries_and_a_tie_is_called_one(tmp_path):
    from amg.benchmark.query_record import save_query_record
    from amg.benchmark.results import write_csv
    from amg.reporting.loading import load_reports

    rows = [_row("unpruned", 1, None, 0.30, saving=0.0), _row("save0.2:heads:random", 1, 1.2, 0.20),
            _row("save0.2:heads:amg", 1, 1.2, 0.25), _row("save0.2:heads:amg/per-block", 1, 1.2, 0.205)]
    csv_path = write_csv(rows, tmp_path, "cpu-2c", "r1")
    queries = 400
    random_ap = [0.2] * queries
    better = [0.25] * queries  # every query 5 points better: decided
    mixed = [0.2 + (0.3 if i % 10 == 0 else -0.03) for i in range(queries)]  # a few much better, most worse
    save_query_record(csv_path, {
        "save0.2:heads:random": {"occluded": {"ap": random_ap, "rank1": [0] * queries}},
        "save0.2:heads:amg": {"occluded": {"ap": better, "rank1": [0] * queries}},
        "save0.2:heads:amg/per-block": {"occluded": {"ap": mixed, "rank1": [0] * queries}},
    })
    body = {row[0].strip("*"): row for row in _body(dict(comparison_tables(load_reports(tmp_path)))[
        "cpu-2c / small / cpu: 20% of MACs saved"])}
    assert body["heads:amg"][-1] == "+5.0 [+5.0, +5.0]"
    assert body["heads:amg/per-block"][-1].startswith("tie [")
    assert body["heads:random"][-1] == "—"


def test_seeds_of_a_random_configuration_show_as_their_mean_and_spread():
    study = _frame(_row("unpruned", 1, None, 0.30, saving=0.0),
                   _row("save0.2:heads:random", 1, 1.20, 0.20), _row("save0.2:heads:random~s1", 1, 1.22, 0.26),
                   _row("save0.2:heads:random~s2", 1, 1.24, 0.23), _row("save0.2:heads:amg", 1, 1.21, 0.25))
    body = _body(dict(comparison_tables(study))["cpu-2c / small / cpu: 20% of MACs saved"])
    random = next(row for row in body if row[0].strip("*").startswith("heads:random"))
    assert random[0].strip("*") == "heads:random ×3"
    assert random[3] == "1.22" and random[11] == "23.0"  # mean speed-up and mean occluded mAP
    assert random[-1] == "spread of 3 seeds: 6.0"  # max - min occluded mAP, points
    assert len(body) == 3  # unpruned, amg, one random row for the three draws


def test_a_seed_names_a_draw_of_a_random_policy_only():
    from amg.benchmark.profiles import PruneSpec, equal_macs_specs

    spec = PruneSpec.from_config_id("save0.2:heads:random~s2@ft300")
    assert spec.seed == 2 and spec.config_id == "save0.2:heads:random~s2@ft300"
    assert PruneSpec.from_config_id("save0.2:heads:amg~s2") is None
    assert {s.seed for s in equal_macs_specs() if s.random} == {0, 1, 2}
    assert all(s.seed == 0 for s in equal_macs_specs() if not s.random)


def test_models_timed_without_data_get_no_equal_macs_table_and_models_do_not_mix():
    timed_only = [{**row, "model": "vit_base", "occluded_mAP": None, "query_mAP": None, "query_rank1": None,
                   "occluded_rank1": None} for row in STUDY.to_dict("records")]
    other = [{**row, "model": "vit_small"} for row in STUDY.to_dict("records")]
    tables = dict(comparison_tables(pd.concat([STUDY, pd.DataFrame(timed_only), pd.DataFrame(other)])))
    assert sorted(tables) == ["cpu-2c / small / cpu: 20% of MACs saved", "cpu-2c / small / cpu: 30% of MACs saved",
                              "cpu-2c / vit_small / cpu: 20% of MACs saved", "cpu-2c / vit_small / cpu: 30% of MACs saved"]
    assert tables["cpu-2c / small / cpu: 20% of MACs saved"] == tables["cpu-2c / vit_small / cpu: 20% of MACs saved"]
