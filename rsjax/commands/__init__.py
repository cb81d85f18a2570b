"""The `rsjax` commands whose work lives in the library (data/, models/, predict):
each module holds one command's options (`add_arguments`) and its run (`run`),
so that the library never imports the command line. `rsjax.cli` dispatches."""
