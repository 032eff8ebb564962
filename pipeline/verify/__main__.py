"""`python -m pipeline.verify run_dir=<dir> ...` (see `pipeline.verify`)."""
from ..dataset_health import exit_skipping_native_teardown
from . import main

exit_skipping_native_teardown(main())
