"""`python -m pipeline.dataset <group>` with {"run_dir", "stage"} (JSON) on stdin: one shard group's Deep Lake
writer (`pipeline.dataset.writer.main`; an array task, or a child of the ingest finish step)."""
import sys

from .. import dataset_health as health
from . import prestart_writer_probes

# The probe child starts before the writer's imports (pyarrow, the verifier, Deep Lake), so its own start-up runs
# beside them instead of beside the write; it imports the module of the writer's row check (`NEW_ROWS_CHECK`) too.
prestart_writer_probes()

from .writer import main  # noqa: E402

health.exit_skipping_native_teardown(main(sys.argv[1:]))
