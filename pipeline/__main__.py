import sys

from .cli import COMMANDS, main
from .logs import configure

configure()
code = main()
# verify / report / status and the ingest stage read or write the Deep Lake dataset: end without the native teardown
if (sys.argv[1:2] and sys.argv[1] in COMMANDS) or "stage=ingest" in sys.argv[1:]:
    from .dataset_health import exit_skipping_native_teardown

    exit_skipping_native_teardown(int(code or 0))
sys.exit(code)
