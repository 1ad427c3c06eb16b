"""The records store: loose records, packing them into one archive per kind, reading both."""

import json
import tarfile
from pathlib import Path

import pytest

from experiments.research.proxy_fidelity import records
from experiments.research.proxy_fidelity.records import Records


def _write_loose(out, name, record):
    f = out / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(record, indent=1))
    return f


def test_pack_folds_loose_records_into_one_archive_per_kind_and_reads_them_back(tmp_path):
    out = tmp_path / "pf"
    recs = {"runs/bk-sdm-base.json": {"candidate": "bk-sdm-base", "evals": {"400": {"long": {"proxy_fid": 47.9892578125}}}},
            "runs/drop-mid.json": {"candidate": "drop-mid", "curve": [{"step": 1, "loss": 0.123456}]},
            "replicates/bk-sdm-base.seed1.json": {"candidate": "bk-sdm-base", "train_seed": 1},
            "sweep/b4-lr5e-4/asdm-m1.json": {"candidate": "asdm-m1"},
            "sweep/calibration/asdm-m1.json": {"candidate": "asdm-m1", "calibration": True}}
    raw = {name: _write_loose(out, name, r).read_bytes() for name, r in recs.items()}
    # an export beside the records (replicates/<tag>/...) and the noise report are no records
    export = _write_loose(out, "replicates/seed1/bk-sdm-base-long/hybridsd_nas.json", {"export": True})
    _write_loose(out, "noise_floor.json", {"fid_sd": 1.0})
    store = Records(out)
    before = {n: store.read(n) for n in recs}
    assert store.pack() == {"runs": 2, "replicates": 1, "sweep": 2}
    assert sorted(p.name for p in out.iterdir()) == ["noise_floor.json", "replicates", "replicates.tar.xz", "runs.tar.xz",
                                                      "sweep.tar.xz"]
    assert export.is_file() and not (out / "runs").exists() and not (out / "sweep").exists()
    # the archive holds the files as written, under their names (tar -xJf gives the folders back)
    with tarfile.open(out / "runs.tar.xz", "r:xz") as tf:
        assert {m.name: tf.extractfile(m).read() for m in tf} == {n: raw[n] for n in recs if n.startswith("runs/")}
    assert {n: store.read(n) for n in recs} == before
    assert store.names("runs/*.json") == ["runs/bk-sdm-base.json", "runs/drop-mid.json"]
    assert store.names("sweep/*/*.json") == ["sweep/b4-lr5e-4/asdm-m1.json", "sweep/calibration/asdm-m1.json"]
    assert store.names("replicates/*.json") == ["replicates/bk-sdm-base.seed1.json"]  # the export is not one
    assert store.exists("runs/drop-mid.json") and not store.exists("runs/nothing.json")
    with pytest.raises(FileNotFoundError):
        store.read("runs/nothing.json")
    # packing again with nothing loose changes nothing; the same records packed anew give the same bytes
    packed = (out / "runs.tar.xz").read_bytes()
    assert store.pack() == {}
    again = tmp_path / "again"
    for name, data in raw.items():
        (again / name).parent.mkdir(parents=True, exist_ok=True)
        (again / name).write_bytes(data)
    Records(again).pack()
    assert (again / "runs.tar.xz").read_bytes() == packed


def test_a_record_written_after_packing_is_read_and_a_later_pack_takes_it_in(tmp_path):
    out = tmp_path / "pf"
    _write_loose(out, "runs/a.json", {"candidate": "a", "fid": 1.0})
    _write_loose(out, "runs/b.json", {"candidate": "b", "fid": 2.0})
    store = Records(out)
    store.pack()
    # a new record, and an update of a packed one (a rescore): both loose, both read in place of the archive
    f = store.write("runs/c.json", {"candidate": "c", "fid": 3.0})
    assert f == out / "runs" / "c.json" and json.loads(f.read_text()) == {"candidate": "c", "fid": 3.0}
    store.write("runs/a.json", {"candidate": "a", "fid": 1.5})
    assert store.names("runs/*.json") == ["runs/a.json", "runs/b.json", "runs/c.json"]
    assert [store.read(n)["fid"] for n in store.names("runs/*.json")] == [1.5, 2.0, 3.0]
    # another Records on the same directory (another script) reads the same
    assert Records(out).read("runs/c.json")["fid"] == 3.0
    assert store.pack() == {"runs": 2}
    assert not (out / "runs").exists()
    assert [Records(out).read(n)["fid"] for n in Records(out).names("runs/*.json")] == [1.5, 2.0, 3.0]
    # only record names of the known kinds are written
    for bad in ("runs/x/y.json", "sweep/x.json", "exports/x.json", "runs/x.txt"):
        with pytest.raises(ValueError):
            store.write(bad, {})


def test_names_match_part_by_part_and_sort_as_path_glob_does():
    assert records.matches("sweep/b4/x.json", "sweep/*/*.json") and not records.matches("sweep/b4/x.json", "sweep/*.json")
    assert not records.matches("replicates/seed1/bk-sdm-base-long/hybridsd_nas.json", "replicates/*.json")
    # by parts: "b4/..." before "b4-x/...", as sorted(Path.glob(...)) orders them
    assert sorted(["sweep/b4-x/a.json", "sweep/b4/a.json"], key=records._key) == ["sweep/b4/a.json", "sweep/b4-x/a.json"]


def test_pack_and_list_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "pf"
    _write_loose(out, "ema_check/bk-sdm-tiny.seed0.json", {"candidate": "bk-sdm-tiny"})
    assert records.main(["pack", "--out", str(out)]) == 0
    assert (out / "ema_check.tar.xz").is_file() and "1 loose record packed" in capsys.readouterr().err
    assert records.main(["list", "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == ["ema_check/bk-sdm-tiny.seed0.json"]
    with pytest.raises(SystemExit) as e:
        records.main(["pack", "--out", str(tmp_path / "nowhere")])
    assert e.value.code == 2


def test_the_repository_archives_hold_every_record():
    out = Path(__file__).resolve().parents[4] / "results" / "proxy_fidelity"
    if not (out / "runs.tar.xz").is_file():
        pytest.skip("no packed records here")
    store = Records(out)
    # the records measured so far (more may come); every one a JSON object naming its candidate
    least = {"runs": 30, "runs_teacher_v1": 9, "replicates": 111, "settle": 25, "sweep": 108, "ema_check": 8}
    for kind, n in least.items():
        names = store.names(records.pattern_of(kind))
        assert len(names) >= n, kind
        assert all(store.read(name)["candidate"] for name in names)
