"""`python -m pipeline.dataset <group>` with {"run_dir", "stage"} (JSON) on stdin: one shard group's Deep Lake
writer (`pipeline.dataset.writer.main`; an array task, or a child of the ingest finish step)."""
import sys

from .. import dataset_health as health
from .writer import main

health.exit_skipping_native_teardown(main(sys.argv[1:]))
