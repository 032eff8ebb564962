"""`python -m pipeline.report run_dir=<dir>`: writes the run report, prints its path."""
from ..dataset_health import exit_skipping_native_teardown
from ..logs import configure
from . import main

configure()
exit_skipping_native_teardown(main())
