"""The paper's experiments, each in one command that resumes where it stopped.

    rsjax experiments tables --workdir work/tables [--variant demo]
    rsjax experiments table3 --workdir work/table3 [--variant demo]

`rsjax experiments NAME --help` describes each one.
"""

# name -> (module, one-line summary), for `rsjax experiments NAME` (see rsjax.cli).
SUBCOMMANDS = {
    "tables": ("rsjax.experiments.fusion_tables",
               "Tables 1 and 2: RS-SPADE against pix2pix, and on each source subset"),
    "table3": ("rsjax.experiments.segmentation_table",
               "Table 3 and Figure 8: RS-UNet on real against real + generated images"),
}
