"""The `rsjax` command line: every subcommand answers --help with its options,
user errors are one `error:` line with exit status 2 that create nothing, and
the demo runs from a non-editable install in another directory."""
from __future__ import annotations

import importlib
import inspect
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rsjax import bench, cli, experiments

ROOT = Path(__file__).resolve().parents[1]

# Command groups (`rsjax experiments NAME`, `rsjax bench NAME`) list their own subcommands.
GROUPS = {"experiments": experiments.SUBCOMMANDS, "bench": bench.SUBCOMMANDS}
SUBCOMMANDS = [[name] for name in cli.COMMANDS if name not in GROUPS] + \
              [[group, name] for group, names in GROUPS.items() for name in names]


def _module(words: list[str]):
    name = cli.COMMANDS[words[0]][0] if len(words) == 1 else GROUPS[words[0]][words[1]][0]
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not in this tree")
    return importlib.import_module(name)


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_answers_help_with_its_options(words, capsys):
    module = _module(words)
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rsjax {' '.join(words)} ")
    # What it does (the module docstring's first line), then every option with a help string.
    assert cli.description(module.__doc__).splitlines()[0] in out
    parser = cli.make_parser("rsjax", module.__doc__, module.add_arguments)
    for action in parser._actions:
        if action.help == "==SUPPRESS==":
            continue                                    # internal (bench_ingest's child process)
        assert action.help, f"{' '.join(words)}: {action.option_strings or action.dest} has no help"
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        assert name in out
        for option in action.option_strings:
            assert option == "-h" or option.startswith("--") and "-" not in option[2:], \
                f"{option}: options are --snake_case"


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
    # The commands a user works with first, the developers' tools under their own heading.
    users, developers = out.split("for developers")
    assert all(f"  {name} " in developers for name in cli.DEVELOPER_COMMANDS)
    assert not any(f"  {name} " in developers for name in cli.COMMANDS
                   if name not in cli.DEVELOPER_COMMANDS)
    assert set(cli.DEVELOPER_COMMANDS) <= set(cli.COMMANDS)
    for group, names in GROUPS.items():
        assert cli.main([group, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(f"  {name} " in out for name in names)


@pytest.mark.parametrize("old, new", [(["bench_layers"], ["bench", "layers"]),
                                      (["bench", "--parts", "matmul"], ["bench", "steps", "--parts", "matmul"])])
def test_old_command_names_still_work_and_name_the_new_one(old, new, capsys):
    """Renamed commands run for one more release, with one line naming the new form."""
    assert cli.main([*old, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: rsjax {' '.join(new[:2])} ")
    assert err.count("\n") == 1 and f"is now `rsjax {' '.join(new[:2])}" in err


def test_python_m_module_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "rsjax.commands.ingest", "--help"], cwd=ROOT / "tests",
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("usage: python -m rsjax.commands.ingest ")
    assert "--tile_size" in proc.stdout and "--allow_missing_lulc" in proc.stdout


# ---------------------------------------------------------------------------
# User errors: one line, exit status 2, no traceback, nothing created
# ---------------------------------------------------------------------------
USER_ERRORS = {
    "train typo": (["train", "--config", "fusion:demo", "--workdir", "run",
                    "--config.total_step=3"],
                   "--config.total_step: no such config key. Did you mean --config.total_steps?"),
    "train bad value": (["train", "--config", "fusion:demo", "--workdir", "run",
                         "--config.total_steps=many"], "--config.total_steps=many: expected int"),
    "train unknown config": (["train", "--config", "fusoin:demo", "--workdir", "run"],
                             "--config fusoin: unknown config. Did you mean 'fusion'?"),
    "train unknown variant": (["train", "--config", "fusion:demo,sources=lulc+sar", "--workdir",
                               "run"], "sar"),
    "train missing config file": (["train", "--config", "mine/fusion.py:demo", "--workdir", "run"],
                                  "--config mine/fusion.py: no such config file"),
    "train manual without folder": (["train", "--config", "fusion:manual,demo", "--workdir", "run",
                                     "--config.data.data_dir=tfds"],
                                    "no folder of exports was given: pass --config.data.manual_dir=DIR"),
    "train manual missing folder": (["train", "--config", "segmentation:manual", "--workdir", "run",
                                     "--config.data.data_dir=tfds",
                                     "--config.data.manual_dir=exports"], "exports: not a folder"),
    "train saved config missing": (["train", "--config", "old/config.json", "--workdir", "run"],
                                   "--config old/config.json: no such file"),
    "train negative steps": (["train", "--config", "fusion:demo", "--workdir", "run",
                              "--config.data.data_dir=tfds", "--config.total_steps=-5"],
                             "--config.total_steps=-5: must be at least 1"),
    "train zero batch": (["train", "--config", "fusion:demo", "--workdir", "run",
                          "--config.data.data_dir=tfds", "--config.global_batch_size=0"],
                         "--config.global_batch_size=0: must be at least 1"),
    "train zero tile": (["train", "--config", "segmentation:demo", "--workdir", "run",
                         "--config.data.data_dir=tfds", "--config.data.tile_size=0"],
                        "--config.data.tile_size=0: must be at least"),
    "train unknown generator": (["train", "--config", "fusion:demo", "--workdir", "run",
                                 "--config.data.data_dir=tfds", "--config.generator.name=foo"],
                                "--config.generator.name=foo: unknown; choose one of rs_spade"),
    "train flow unknown solver": (["train", "--config", "fusion:demo,model=flow", "--workdir", "run",
                                   "--config.data.data_dir=tfds", "--config.flow.solver=rk4"],
                                  "--config.flow.solver=rk4: unknown; choose one of euler, heun"),
    "train flow zero sampling steps": (["train", "--config", "fusion:demo,model=flow", "--workdir",
                                        "run", "--config.data.data_dir=tfds",
                                        "--config.flow.sample_steps=0"],
                                       "--config.flow.sample_steps=0: must be at least 1"),
    "train unknown discriminator": (["train", "--config", "pix2pix:demo", "--workdir", "run",
                                     "--config.data.data_dir=tfds",
                                     "--config.discriminator.name=foo"],
                                    "--config.discriminator.name=foo: unknown"),
    "train unknown model": (["train", "--config", "segmentation:demo", "--workdir", "run",
                             "--config.data.data_dir=tfds", "--config.model.name=unet3"],
                            "--config.model.name=unet3: unknown; choose one of rs_unet"),
    "train float16": (["train", "--config", "fusion:demo", "--workdir", "run",
                       "--config.data.data_dir=tfds", "--config.dtype=float16"],
                      "--config.dtype=float16: unknown; choose one of float32, bfloat16"),
    "train negative lr": (["train", "--config", "fusion:demo", "--workdir", "run",
                           "--config.data.data_dir=tfds", "--config.optim.g_lr=-1e-4"],
                          "--config.optim.g_lr=-0.0001: a learning rate must be"),
    "train unknown source": (["train", "--config", "fusion:demo", "--workdir", "run",
                              "--config.data.data_dir=tfds", "--config.data.sources=lulc+sar"],
                             "--config.data.sources: unknown sar"),
    "train zero log cadence": (["train", "--config", "fusion:demo", "--workdir", "run",
                                "--config.data.data_dir=tfds", "--config.log_every_steps=0"],
                               "--config.log_every_steps=0: must be at least 1"),
    "train negative checkpoint cadence": (["train", "--config", "fusion:demo", "--workdir", "run",
                                           "--config.data.data_dir=tfds",
                                           "--config.checkpoint_every_steps=-1"],
                                          "--config.checkpoint_every_steps=-1: must be at least 0"),
    "evaluate missing workdir": (["evaluate", "--workdir", "missing_run"],
                                 "missing_run: workdir does not exist"),
    "build unknown config": (["build", "--dataset", "nosuchconfig", "--data_dir", "tfds"],
                             "--dataset nosuchconfig: unknown dataset config"),
    "build close config": (["build", "--dataset", "synthetic_dmeo", "--data_dir", "tfds"],
                           "Did you mean 'synthetic_demo'?"),
    "build overrides": (["build", "--dataset", "synthetic_demo", "--config.tile_size=3"],
                        "--config.tile_size=3: this command takes no config overrides"),
    "build bad tile size": (["build", "--dataset", "synthetic_demo", "--tile_size", "4",
                             "--data_dir", "tfds"], "tile_size=4 is too small"),
    "build manual without dir": (["build", "--dataset", "manual", "--data_dir", "tfds"],
                                 "give --manual_dir FOLDER"),
    "build manual missing dir": (["build", "--dataset", "manual", "--manual_dir", "exports",
                                  "--data_dir", "tfds"], "exports: not a folder"),
    "build manual_dir for synthetic": (["build", "--dataset", "synthetic_demo", "--manual_dir",
                                        "."], "only the manual config reads it"),
    "predict missing workdir": (["predict", "--workdir", "missing_run", "--s2", "s2.tif",
                                 "--out", "out/lulc.tif"], "missing_run: workdir does not exist"),
    "ingest missing folder": (["ingest", "exports"], "exports: not a folder"),
    "ingest bad tile size": (["ingest", ".", "--tile_size", "2"], "tile_size must be at least 3"),
    "synthesize missing workdir": (["synthesize", "--workdir", "missing_run"],
                                   "missing_run: workdir does not exist"),
    "scenes too small": (["scenes", "--out_dir", "scenes", "--size", "8"], "8 px is too small"),
    "scenes none": (["scenes", "--out_dir", "scenes", "--scenes", "0"],
                    "argument --scenes: 0: must be a positive integer"),
    "couplings missing folder": (["couplings", "--scenes_dir", "scenes"], "scenes: not a folder"),
    "bench_pipeline unknown config": (["bench", "pipeline", "--dataset", "nosuch"],
                                      "--dataset nosuch: unknown dataset config"),
    "bench layers unknown model": (["bench", "layers", "--models", "G,X"], "unknown X"),
    "params bad sources": (["params", "--sources", "lulc=nine"], "must look like lulc=9"),
    "report unknown scale": (["experiments", "report", "--workdir", "exp", "--scale", "huge"],
                             "invalid choice: 'huge'"),
    "report unknown table": (["experiments", "report", "--workdir", "exp", "--tables", "table4"],
                             "--tables table4: choose from table1, table2, table3"),
    "report nothing run": (["experiments", "report", "--workdir", "exp"],
                           "exp: no such experiment folder; add --run"),
    "unknown subcommand": (["trian"], "unknown subcommand 'trian'. Did you mean 'train'?"),
    "unknown experiment": (["experiments", "table4"], "unknown experiments 'table4'"),
}


@pytest.mark.parametrize("argv, message", USER_ERRORS.values(), ids=USER_ERRORS.keys())
def test_user_errors_are_one_line_exit_2_and_create_nothing(argv, message, tmp_path,
                                                            monkeypatch, capsys):
    # In an empty directory, so that anything a command creates (relative
    # defaults included) shows.
    monkeypatch.chdir(tmp_path)
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert len([line for line in captured.err.splitlines() if "error:" in line]) == 1
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("argv", [["synthesize", "--workdir", "run"],
                                  ["evaluate", "--workdir", "run"]], ids=" ".join)
def test_a_workdir_without_checkpoint_is_an_error_that_writes_nothing(argv, tmp_path, monkeypatch,
                                                                      capsys):
    from rsjax.config_loader import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(load_config("fusion:demo").to_json_best_effort())
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "run") == ["config.json"]


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from rsjax.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown dataset config"):
        cli.main(["build", "--dataset", "nosuchconfig", "--verbose"])


# ---------------------------------------------------------------------------
# A non-editable install, used from another directory
# ---------------------------------------------------------------------------
def _copy_source(dest: Path) -> Path:
    """The checkout's files as an sdist would have them (no work/, no build
    leftovers), so building the wheel writes nothing into the checkout."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "work", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


def _pip_install(source: Path, target: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--target", str(target), str(source)]
    if importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel"):
        command.insert(4, "--no-build-isolation")     # no need to fetch the build tools
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_demo_runs_from_a_non_editable_install_in_another_directory(tmp_path):
    site = tmp_path / "site"
    _pip_install(_copy_source(tmp_path / "src"), site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               # One device, and the tests' fast-compile flags (see conftest.py).
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

    def run(*argv: str) -> str:
        proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{argv}\n{proc.stderr[-4000:]}"
        return proc.stdout

    # Everything the commands import comes from the install, not the checkout.
    files = json.loads(run(sys.executable, "-c", (
        "import json, rsjax.cli, rsjax.configs.pix2pix, rsjax.launch.tpu, "
        "rsjax.tfds_builder.rs_multisource.rs_multisource_dataset_builder as b; "
        "print(json.dumps([m.__file__ for m in (rsjax.cli, rsjax.configs.pix2pix, "
        "rsjax.launch.tpu, b)]))")))
    assert all(Path(f).is_relative_to(site) for f in files), files

    data_dir, workdir = cwd / "tfds", cwd / "runs" / "demo"
    # The quick start's train (its dataset built on the way), shrunk to two tiny steps.
    run(sys.executable, "-m", "rsjax.cli", "train", "--config", "pix2pix:demo",
        "--workdir", "runs/demo", "--config.data.data_dir=tfds", "--config.total_steps=2",
        "--config.global_batch_size=8", "--config.eval_batch_size=8",
        "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
        "--config.image_every_steps=0", "--config.eval_every_steps=0",
        "--config.final_eval_split=", "--config.optim.decay_start_step=100000",
        "--config.generator.ngf=4", "--config.discriminator.ndf=4")
    assert (workdir / "checkpoints" / "2").is_dir()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["generator"]["name"] == "pix2pix_unet" and saved["total_steps"] == 2

    scores = json.loads(run(sys.executable, "-m", "rsjax.cli", "evaluate", "--workdir", "runs/demo"))
    assert scores["step"] == 2 and scores["split"] == "test" and scores["num_images"] > 0
    assert 0 < scores["psnr"] < 60 and -1 <= scores["ssim"] <= 1
    assert json.loads((workdir / "eval_test_2.json").read_text()) == scores

    # The console script, and the dataset the train command built: found, not rebuilt.
    summary = json.loads(run(str(site / "bin" / "rsjax"), "build", "--dataset", "synthetic_demo",
                             "--data_dir", str(data_dir)))
    assert summary["built"] is False and summary["dataset"] == "rs_multisource/synthetic_demo"
    assert sum(summary["splits"].values()) > 0


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_names_no_internal_issue(words, capsys):
    """Help is for users: no reference to the project's issue tracker."""
    _module(words)
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bissue \d+", out, re.IGNORECASE), out


def _examples(doc: str) -> list[list[str]]:
    """The example commands of a help text: indented lines starting `rsjax `,
    continuation lines joined, comments dropped, split as a shell would."""
    found, pending = [], None
    for line in cli.description(doc).splitlines():
        text = line.strip()
        if pending is None and not (line.startswith("    ") and text.startswith("rsjax ")):
            continue
        pending = text if pending is None else f"{pending} {text}"
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        found.append(shlex.split(pending, comments=True))
        pending = None
    return found


def _parser_of(words: list[str]):
    """The parser and remaining arguments of an example `rsjax CMD [NAME] ...`."""
    name = words[1]
    if name in GROUPS:
        module, rest = importlib.import_module(GROUPS[name][words[2]][0]), words[3:]
    else:
        module, rest = importlib.import_module(cli.COMMANDS[name][0]), words[2:]
    return cli.make_parser("rsjax", module.__doc__, module.add_arguments), rest


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=" ".join)
def test_help_is_short_and_its_examples_paste(words, capsys):
    """Every command's help: at most a dozen lines of prose before the options,
    examples as `rsjax ...` that parse with the options they name (continuation
    lines kept: a single backslash at a docstring's line end would join them),
    and no `python -m` forms."""
    module = _module(words)
    description = cli.description(module.__doc__).splitlines()
    prose = [line for line in description if line.strip() and not line.startswith("    ")]
    assert len(prose) <= 12, f"{' '.join(words)}: {len(prose)} lines of prose before the options"
    assert "python -m" not in module.__doc__
    examples = _examples(module.__doc__)
    assert examples, f"{' '.join(words)}: no example"
    for example in examples:
        parser, rest = _parser_of(example)
        try:
            cli.parse(parser, rest)
        except SystemExit:
            pytest.fail(f"the example `{' '.join(example)}` does not parse: "
                        f"{capsys.readouterr().err}")
    # A lost continuation shows as an option run into a long line of the example before it.
    source = inspect.getsource(module)
    docstring = source[source.index('"""'):source.index('"""', source.index('"""') + 3)]
    assert not re.search(r"(?<!\\)\\\n", docstring), "a single backslash ends a docstring line"


def test_the_examples_check_finds_a_lost_continuation_and_a_bad_option():
    joined = _examples("x\n\n    rsjax build --dataset manual \\\n        --manual_dir d  # yours\n")
    assert joined == [["rsjax", "build", "--dataset", "manual", "--manual_dir", "d"]]
    parser, rest = _parser_of(["rsjax", "build", "--no_such_option"])
    with pytest.raises(SystemExit):
        cli.parse(parser, rest)


@pytest.mark.parametrize("argv, note, error", [
    (["synthesize", "--fusion_workdir", "missing_run"], "--fusion_workdir is now `rsjax synthesize "
     "--workdir`", "missing_run: workdir does not exist"),
    (["report", "missing_run"], "is now `rsjax report --workdir missing_run`", "missing_run"),
    (["build", "--config", "nosuch", "--data_dir", "tfds"], "--config is now `rsjax build --dataset`",
     "--dataset nosuch: unknown dataset config"),
    (["experiments", "report", "--workdir", "exp", "--no_run"], "--no_run is now the default",
     "exp: no such experiment folder; add --run"),
    (["couplings", "--scenes_dir", "scenes", "--json_out", "r.json"], "--json_out is now "
     "`rsjax couplings --out`", "scenes: not a folder"),
    (["ingest", "exports", "--dry_run"], None, "exports: not a folder"),
])
def test_old_option_names_still_work_for_one_release(argv, note, error, tmp_path, monkeypatch,
                                                     capsys):
    """The previous release's option names do what the new ones do, after one
    line naming the new form; `ingest --dry_run` is accepted (it never writes)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and error in err[-1]
    assert (note is None and len(err) == 1) or (len(err) == 2 and note in err[0])
    assert list(tmp_path.iterdir()) == []


def test_bench_build_takes_a_comma_list_and_the_old_space_separated_one(capsys):
    from rsjax.bench.build import worker_counts
    from rsjax.errors import UserError

    assert worker_counts(["0,1,2"]) == [0, 1, 2] and capsys.readouterr().err == ""
    assert worker_counts(["0", "2"]) == [0, 2]
    assert "is now --workers 0,2" in capsys.readouterr().err
    with pytest.raises(UserError, match="--workers"):
        worker_counts(["-1"])
