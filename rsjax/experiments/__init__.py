"""The paper's experiments, made answerable: several seeds, intervals, verdicts.

    rsjax experiments report --scale demo --workdir work/exp_demo --run
    rsjax experiments report --scale bench --workdir work/exp_bench --run
    rsjax experiments cloud_removal --scale demo --workdir work/clouds_demo --run

With `--run`, each trains every run of its plan that has not finished
(resuming an interrupted one); then, and without `--run` only, it writes the
tables, claims and figures of the finished runs;
`rsjax experiments NAME --help` describes each experiment.
"""

# name -> (module, one-line summary), for `rsjax experiments NAME` (see rsjax.cli).
SUBCOMMANDS = {
    "report": ("rsjax.experiments.paper_tables",
               "Tables 1-3 and Figure 8 at a scale, over seeds, with intervals and verdicts"),
    "cloud_removal": ("rsjax.experiments.cloud_removal",
                      "beyond the paper: cloud removal as SEN12MS-CR reports it, with the peers' "
                      "numbers"),
    "export": ("rsjax.experiments.export",
               "copy an experiment's records (no checkpoints) to commit or carry to another "
               "machine"),
}
