"""Run records say what produced them: the commit, library versions, the
dataset's fingerprint, threads and machine; a report names what differs."""
from __future__ import annotations

import subprocess
from pathlib import Path

import jax

from rsjax import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_the_code_is_this_checkouts_commit_and_cleanliness():
    code = provenance.code()
    if not (ROOT / ".git").exists():                # an installed copy: nothing to name
        assert code == {"commit": None, "clean": None}
        return
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"]).returncode == 0
    assert code == {"commit": head, "clean": unchanged}


def test_versions_of_what_computes_and_none_for_what_is_missing(monkeypatch):
    versions = provenance.package_versions()
    assert versions["jax"] == jax.__version__ and versions["numpy"] is not None
    monkeypatch.setattr(provenance, "COMPUTING_PACKAGES", ("jax", "no-such-distribution"))
    assert provenance.package_versions() == {"jax": jax.__version__, "no-such-distribution": None}


def test_a_datasets_fingerprint_names_it_and_changes_with_its_tiles(demo_data_dir,
                                                                    cloudy_data_dir):
    from trainer_utils import tiny_cloud_config, tiny_fusion_config

    demo = tiny_fusion_config(demo_data_dir).data
    first = provenance.dataset_fingerprint(demo)
    assert first == provenance.dataset_fingerprint(demo) and len(first["sha256"]) == 64
    assert first["name"].startswith("rs_multisource/")
    cloudy = provenance.dataset_fingerprint(tiny_cloud_config(cloudy_data_dir).data)
    assert cloudy["sha256"] != first["sha256"]
    unbuilt = demo.copy_and_resolve_references()
    unbuilt.data_dir = str(demo_data_dir / "nothing_here")
    assert provenance.dataset_fingerprint(unbuilt) is None


def test_a_record_holds_every_part_and_differences_name_what_differs(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    record = provenance.record()
    assert set(record) == {"code", "packages", "threads", "machine"}
    assert record["threads"]["environment"]["XLA_FLAGS"].endswith("count=8")
    assert record["threads"]["cores_usable"] >= 1 and record["machine"]["cpu_count"] >= 1

    def run(commit, numpy="2.0", data="a"):
        return {"provenance": {"code": {"commit": commit}, "packages": {"numpy": numpy, "jax": "0.10.2"},
                               "dataset": {"sha256": data}}}
    assert provenance.differences([run("c1"), run("c1")]) == {}
    assert provenance.differences([run("c1"), run("c2", numpy="2.1"), {"seed": 3}]) == {
        "commit": [None, "c1", "c2"],
        "package numpy": ["2.0", "2.1"], "dataset": [None, "a"]}
